import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def pytest_collection_modifyitems(config, items):
    if HAS_TORCH:
        return
    skip = pytest.mark.skip(reason="needs the torch extra (torch, transformers, peft)")
    for item in items:
        if "torch" in item.keywords:
            item.add_marker(skip)
