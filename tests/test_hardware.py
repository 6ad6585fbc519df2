"""Every bundled profile validates, and every number carries a source."""
import json
from pathlib import Path

import pytest

from simcost.hardware import list_profiles, load_profile
from simcost.hardware.profile import PROFILE_DIR


@pytest.mark.parametrize("name", list_profiles())
def test_profile_has_sources(name):
    prof = load_profile(name)
    raw = json.loads((PROFILE_DIR / f"{name}.json").read_text())

    def walk(x):
        if isinstance(x, dict):
            if "value" in x:
                assert x.get("source"), f"{name}: number without source: {x}"
            for v in x.values():
                walk(v)
    walk(raw)
    d = prof.device()
    assert d.memory_bytes > 0 and d.memory_bandwidth_bytes_per_s > 0 and d.peak_flops_per_s["fp32"] > 0


def test_required_profiles_present():
    assert {"a100-80gb-sxm", "h100-sxm", "l40s", "rtx-4090", "cpu-generic"} <= set(list_profiles())


def test_user_profile_by_path(tmp_path):
    src = json.loads((PROFILE_DIR / "l40s.json").read_text())
    src["name"] = "my-l40s"
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(src))
    assert load_profile(str(p)).name == "my-l40s"
