import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

def pytest_configure(config):
    """``pytest -m fuzz`` runs the fuzz suite at full size (>= 10,000 inputs); the default run
    takes a few hundred of them."""
    from hypothesis import HealthCheck, settings
    common = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
    settings.register_profile("default-run", max_examples=60, **common)
    settings.register_profile("fuzz", max_examples=2500, **common)
    settings.load_profile("fuzz" if "fuzz" in (config.option.markexpr or "") else "default-run")


HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def pytest_collection_modifyitems(config, items):
    """Without the torch extra, torch tests skip; ``slow`` ones (the full traced tuner x
    architecture matrix) run only under ``pytest -m slow``."""
    full = "slow" in (config.option.markexpr or "")
    slow = pytest.mark.skip(reason="the full matrix runs with `pytest -m slow`")
    skip = pytest.mark.skip(reason="needs the torch extra (torch, transformers, peft)")
    for item in items:
        if "slow" in item.keywords and not full:
            item.add_marker(slow)
        elif "torch" in item.keywords and not HAS_TORCH:
            item.add_marker(skip)
