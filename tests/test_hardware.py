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


# ---- validation of bad profiles: one line, exit 2, through `hardware show` and `estimate`

from simcost.cli import main  # noqa: E402
from simcost.hardware.profile import (SCALAR_FIELDS, TABLE_FIELDS, TimeModelParams,  # noqa: E402
                                      TimeModelSpec)


def _base():
    return json.loads((PROFILE_DIR / "a100-80gb-sxm.json").read_text())


def _set(d, path, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


BAD = [  # (path, value, expected fragment of the one-line message)
    ("memory_bytes.value", -1, "memory_bytes.value must be > 0, got -1"),
    ("memory_bytes.value", 0, "memory_bytes.value must be > 0, got 0"),
    ("memory_bandwidth_bytes_per_s.value", 0, "memory_bandwidth_bytes_per_s.value must be > 0"),
    ("peak_flops_per_s.fp32.value", float("nan"), "peak_flops_per_s.fp32.value must be a finite"),
    ("peak_flops_per_s.bf16.value", float("inf"), "peak_flops_per_s.bf16.value must be a finite"),
    ("peak_flops_per_s.bf16.value", -3e14, "peak_flops_per_s.bf16.value must be > 0"),
    ("runtime_overhead_bytes.value", -1, "runtime_overhead_bytes.value must be >= 0, got -1"),
    ("launch_overhead_s.value", -1e-6, "launch_overhead_s.value must be >= 0"),
    ("launch_overhead_s.value", "5us", "launch_overhead_s.value must be a number"),
    ("launch_overhead_s.value", True, "launch_overhead_s.value must be a number"),
    ("price_usd_per_hour.value", -1, "price_usd_per_hour.value must be >= 0"),
    ("interconnect.bandwidth_bytes_per_s.value", 0,
     'must be > 0, got 0 (a device without a device-to-device link has "interconnect": null)'),
    ("interconnect.latency_s.value", -1, "interconnect.latency_s.value must be >= 0"),
    ("time_model.compute_units.value", 0, "time_model.compute_units.value must be >= 1, got 0"),
    ("time_model.compute_units.value", 1.5, "time_model.compute_units.value must be a whole"),
    ("time_model.matmul_efficiency.value", 0, "time_model.matmul_efficiency.value must be > 0"),
    ("time_model.matmul_efficiency.value", 1.2, "time_model.matmul_efficiency.value must be <= 1"),
    ("time_model.bandwidth_efficiency.value", float("nan"), "must be a finite number"),
    ("time_model.calibration", {"x": [1.0, float("nan")]}, "calibration.x[1] must be finite"),
    ("time_model.stream_table", {"bytes": [2.0, 1.0], "bytes_per_s": [1.0, 1.0]},
     "bytes must be strictly ascending"),
    ("time_model.gemm_table", {"fp32": {"m": [1, 2], "n": [1, 2], "k": [1, 2],
                                        "flops_per_s": [[[1.0, 1.0]]]}}, "grid"),
    ("time_model.gemm_table", {"fp64": {"m": [1, 2], "n": [1, 2], "k": [1, 2],
                                        "flops_per_s": [[[1.0] * 2] * 2] * 2}}, "fp64"),
    ("time_model.special_rates", {"exp": 0}, "time_model.special_rates.exp must be > 0"),
]


def _one_error(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("simcost: error: "), (rc, err)
    assert "Traceback" not in err
    return lines[0]


def _estimate(path):
    return ["estimate", "train", "--model", "gpt2", "--hardware", str(path), "--batch", "1",
            "--seq", "64"]


@pytest.mark.parametrize("path,value,expect", BAD, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD])
def test_bad_profile_one_line(tmp_path, capsys, path, value, expect):
    d = _base()
    _set(d, path, value)
    p = tmp_path / "x.json"
    p.write_text(json.dumps(d))
    for argv in (["hardware", "show", str(p)], _estimate(p)):
        line = _one_error(argv, capsys)
        assert "invalid hardware profile" in line and expect in line, line


@pytest.mark.parametrize("content", [b"\xff\xfe{\x00", b'{"name": "caf\xe9"}',
                                     b"[" * 200_000 + b"]" * 200_000, b"[1, 2]", b"{",
                                     b'{"value": ' * 300 + b"1" + b"}" * 300])
def test_unreadable_profile_one_line(tmp_path, capsys, content):
    p = tmp_path / "bad.json"
    p.write_bytes(content)
    for argv in (["hardware", "show", str(p)], _estimate(p)):
        line = _one_error(argv, capsys)
        assert "bad.json" in line


def test_profiles_without_link_have_no_interconnect():
    for name in ("cpu-generic", "rpi5", "apple-m2-ultra", "apple-m4-max",
                 "jetson-agx-orin-64gb", "jetson-orin-nano-8gb"):
        prof = load_profile(name)
        assert prof.interconnect is None, name
        assert "no device-to-device link" in prof.notes["interconnect"]
    for name in list_profiles():
        ic = load_profile(name).interconnect
        assert ic is None or ic.bandwidth_bytes_per_s is None or ic.bandwidth_bytes_per_s.value > 0


def test_hardware_list_loads_everything(capsys):
    assert main(["hardware", "list"]) == 0
    out = capsys.readouterr().out
    for name in list_profiles():
        assert name[:12] in out


# ---- typed time-model fields beside the dict

def test_params_fields_match_the_schema():
    names = {f for f in TimeModelParams.__dataclass_fields__} - {"extras"}
    assert names == set(SCALAR_FIELDS) | set(TABLE_FIELDS) == set(TimeModelSpec.model_fields)


@pytest.mark.parametrize("name", list_profiles())
def test_params_agree_with_dict(name):
    d = load_profile(name).device()
    tm = d.time_model or {}
    for k in SCALAR_FIELDS:
        assert getattr(d.params, k) == tm.get(k)
    assert d.params.extras == {k: v for k, v in tm.items()
                               if k not in SCALAR_FIELDS and k not in TABLE_FIELDS}


def test_params_follow_replace():
    import dataclasses
    d = load_profile("h100-sxm").device()
    assert d.params.matmul_efficiency == pytest.approx(0.803)
    assert d.params.compute_units == 132 and d.params.gemm_table is None
    d2 = dataclasses.replace(d, time_model={**d.time_model, "matmul_efficiency": 0.5})
    assert d2.params.matmul_efficiency == 0.5 and d.params.matmul_efficiency == pytest.approx(0.803)


def test_committed_calibrated_profiles_load():
    """The calibrated profiles the reports were made with stay valid under the schema."""
    root = Path(__file__).resolve().parents[1] / "validation" / "reports"
    found = [p for p in root.glob("calibrated*.json") if not p.name.endswith(".raw.json")]
    assert found
    for p in found:
        assert load_profile(str(p)).device().kind == "cpu"


@pytest.mark.parametrize("name", list_profiles())
def test_no_gpu_is_priced_at_its_datasheet_peak(name):
    """Every GPU profile prices its GEMMs below the datasheet peak: a measured fraction, or the
    derived median of measured GPUs of its vendor, marked derived with its rows named."""
    raw = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    if raw.get("kind") != "gpu":
        return
    eff = raw["time_model"]["matmul_efficiency"]
    assert 0.3 < eff["value"] < 1.0 and eff["source"]
    if "median" in eff["source"]:
        assert eff.get("derived") and eff.get("stand_in") and "HWEFF-MAMF" in eff["source"]
        assert eff["population_p10"] < eff["value"] < eff["population_p90"]
        assert "matmul_efficiency" in load_profile(name).device().stand_ins
    from simcost.sim.timing import TimeModel
    dev = load_profile(name).device()
    tm = TimeModel.from_device(dev)
    for dtype, peak in dev.peak_flops_per_s.items():
        assert tm.matmul_peak(dtype) < peak, dtype
