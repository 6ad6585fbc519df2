"""``simcost validate published``: the CSV parses, every row is evaluated or listed with a
reason, and known rows map to the estimate arguments their framework implies.

Nothing here asserts a predicted time or memory value: only mappings and bookkeeping."""
import csv
import json
import math
from types import SimpleNamespace

import pytest

from simcost.validate import published as P


@pytest.fixture(scope="module")
def rows():
    return P.load_rows()


@pytest.fixture(scope="module")
def results(rows):
    return P.evaluate(rows)


def _row(rows, rid):
    return next(r for r in rows if r["id"] == rid)


def test_csv_parses_completely(rows):
    path = P.default_csv()
    with path.open(newline="", encoding="utf-8") as f:
        n = sum(1 for _ in csv.DictReader(f))
    assert len(rows) == n > 400
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["id"] and r["metric"] and P.source_of(r["id"]) in P.SOURCES


def test_every_row_is_evaluated_or_listed_with_a_reason(rows, results):
    assert [r.id for r in results] == [r["id"] for r in rows]          # none dropped
    for r in results:
        assert r.status in ("evaluated", "unsupported")
        if r.status == "unsupported":
            assert r.reason and "\n" not in r.reason and r.predicted is None
        else:
            assert r.reason == ""
            assert r.kind in P.KINDS
            assert math.isfinite(r.measured) and r.measured > 0
            assert math.isfinite(r.predicted) and r.predicted > 0
            assert r.mapping
    ev = {r.source for r in results if r.status == "evaluated"}
    assert {"FT-QWEN", "FT-TORCHTUNE", "INF-VIDUR-OP"} <= ev


def test_summary_counts_add_up(results):
    summ = P.summarize(results)
    assert sum(e["rows"] for e in summ.values()) == len(results)
    for e in summ.values():
        assert e["evaluated"] + e["unsupported"] == e["rows"]


@pytest.mark.parametrize("text,expected", [
    ("1 (GA 8)", (1, 8)), ("2", (2, 1)), ("8 global (GA 4)", (8, 4)), ("", (None, 1))])
def test_parse_batch(text, expected):
    assert P.parse_batch(text) == expected


def test_parse_lora():
    lo = P.parse_lora("finetune.py defaults: r=64 alpha=16 dropout=0.05 targets "
                      "c_attn,c_proj,w1,w2")
    assert lo == {"r": 64, "alpha": 16.0, "dropout": 0.05,
                  "targets": ("c_attn", "c_proj", "w1", "w2")}


@pytest.mark.parametrize("text,name", [
    ("A100-SXM4-80GB", "a100-80gb-sxm"), ("RTX 4090", "rtx-4090"), ("RTX A6000", "rtx-a6000"),
    ("H100 80GB", "h100-sxm"), ("NVIDIA A100 PCIe", "a100-80gb-pcie"),
    ("single GPU (not stated)", None)])
def test_hardware_names(text, name):
    assert P.hardware_name(text)[0] == name


@pytest.mark.parametrize("text,name", [
    ("Qwen-7B", "qwen-7b"), ("Llama 3.1 8B", "llama-3.1-8b"), ("Llama-2-7B", "llama-2-7b"),
    ("Mistral-7B-v0.1", "mistral-7b"), ("Llama 3.2 3B", "llama-3.2-3b"),
    ("bigscience/T0_3B", None)])
def test_model_names(text, name):
    assert P.model_name(text) == name


def test_qwen_lora_time_row(rows):
    mp = P.map_row(_row(rows, "FT-QWEN-050"))          # Qwen-7B LoRA, 256 tokens, s/it
    d = mp.describe()
    assert (d["model"], d["hardware"], d["batch"], d["grad_accum"], d["seq"]) == \
        ("qwen-7b", "a100-80gb-sxm", 1, 8, 256)
    assert d["peft"] == {"method": "lora", "r": 64, "alpha": 16.0, "dropout": 0.05,
                         "targets": ["c_attn", "c_proj", "w1", "w2"], "adapter_dtype": "bf16"}
    assert d["grad_checkpointing"] and d["attn"] == "flash" and d["optimizer"] == "adamw"
    assert (d["dtype"], d["mixed_precision"]) == ("bf16", "none")
    assert P.metric_value(_row(rows, "FT-QWEN-050"))[:2] == ("step_time", 1.2)


def test_qwen_lora_emb_memory_row(rows):
    row = _row(rows, "FT-QWEN-061")                    # Qwen-7B LoRA (emb), memory
    mp = P.map_row(row)
    assert mp.peft.modules_to_save == ("wte", "lm_head")
    assert mp.peft.adapter_dtype is None                # fp32 storage (peft < 0.7)
    assert mp.memory_scope == "device"
    kind, value, _ = P.metric_value(row)
    assert kind == "memory" and value == pytest.approx(33.7 * 2 ** 30)


def test_qwen_14b_long_sequence_uses_dynamic_ntk_positions(rows):
    mp = P.map_row(_row(rows, "FT-QWEN-114"))          # Qwen-14B at 8192 tokens
    assert mp.seq == 8192 and mp.max_positions == 8192


def test_torchtune_packed_full_finetune_row(rows):
    mp = P.map_row(_row(rows, "FT-TORCHTUNE-019"))     # Llama 3.2 3B, +packed, memory
    d = mp.describe()
    assert (d["model"], d["batch"], d["seq"], d["peft"]["method"]) == \
        ("llama-3.2-3b", 2, 4096, "full")
    assert not d["grad_checkpointing"] and d["memory_scope"] == "torch_allocator"
    assert not mp.caveats
    mp = P.map_row(_row(rows, "FT-TORCHTUNE-032"))     # +8-bit AdamW (tokens/s)
    assert mp.optimizer == "adamw8bit" and mp.grad_checkpointing
    assert any("compile" in c for c in mp.caveats)


def test_torchtune_lora_targets(rows):
    mp = P.map_row(_row(rows, "FT-TORCHTUNE-010"))     # Llama 3.1 8B QLoRA on a 4090
    assert mp.peft.method == "qlora" and mp.peft.r == 8 and len(mp.peft.targets) == 7
    assert mp.hardware == "rtx-4090" and mp.seq == 2048 and mp.batch == 2


@pytest.mark.parametrize("rid,fragment", [
    ("FT-QWEN-025", "GPTQ"),                 # Q-LoRA on an Int4 GPTQ base
    ("FT-QWEN-037", "DeepSpeed"),            # full-parameter: finetune_ds.sh
    ("FT-QWEN-085", "full-parameter"),     # 2-GPU full FT: ZeRO-2 fp32 partitions
    ("FT-QWEN-092", "inter-server"),       # multi-node speed: network not stated
    ("FT-TORCHTUNE-017", "data-dependent"),  # unpacked baseline
    ("FT-TORCHTUNE-037", "data-dependent"),  # "variable (alpaca, unpacked)"
    ("FT-TORCHTUNE-029", "activation offloading"),   # chunked CE / opt-in-bwd are modelled
    ("FT-PEFTREADME-001", "T5"),
    ("FT-PEFTREADME-002", "CPU"),
    ("FT-EDGE-001", "MLX"),
    ("MLPERF-001", "time to train"),   # MLPERF step-time rows are evaluated (issue 4)
    ("INF-TRTLLM-001", "serving"),
    ("HWEFF-MAMF-002", "matmul_efficiency"),
    ("INF-VIDUR-OP-014", "bandwidth_efficiency"),
])
def test_unsupported_reasons(results, rid, fragment):
    r = next(r for r in results if r.id == rid)
    assert r.status == "unsupported" and fragment in r.reason


def test_run_cli_writes_reports(tmp_path, capsys):
    assert P.run_cli(SimpleNamespace(out_dir=str(tmp_path), source="FT-QWEN")) == 0
    data = json.loads((tmp_path / "published.json").read_text())
    assert set(data["summary"]) == {"FT-QWEN"}
    assert all(r["id"].startswith("FT-QWEN") for r in data["rows"])
    md = (tmp_path / "published.md").read_text()
    assert "Unsupported rows" in md and "FT-QWEN-025" in md
    assert "MAPE per source" in capsys.readouterr().out


def test_run_cli_unknown_source(tmp_path):
    from simcost.errors import SimcostError
    with pytest.raises(SimcostError, match="no rows"):
        P.run_cli(SimpleNamespace(out_dir=str(tmp_path), source="NOPE"))


def test_qwen_multi_gpu_lora_memory_maps_to_zero_data_parallel(rows):
    mp = P.map_row(_row(rows, "FT-QWEN-091"))      # Qwen-7B LoRA, 2 servers x 2 GPUs
    assert mp.distributed["devices"] == 4 and mp.distributed["dp"] == 4
    assert mp.distributed["zero"] == 2 and mp.distributed["nodes"] == 2
    assert mp.memory_devices == 4                  # mem_GB_total_all_gpus sums the GPUs
    mp3 = P.map_row(_row(rows, "FT-QWEN-139"))     # Qwen-72B LoRA + DeepSpeed ZeRO-3
    assert mp3.distributed["zero"] == 3


def test_qwen_multi_gpu_memory_is_total_over_devices(results):
    r = next(r for r in results if r.id == "FT-QWEN-091")
    assert r.status == "evaluated" and r.kind == "memory"
    # the total over 4 GPUs, each holding the whole frozen 7B model (ZeRO-2)
    assert r.predicted > 4 * 7e9 * 2


def test_mlperf_mapping_follows_the_submitters_system_config(rows):
    # NVIDIA's NeMo configs: TP overlap and fp8 attention on by default (config_common.sh),
    # both off on L40S (config_L40S_*.sh); the plan itself is left to --parallel auto
    h100 = P.map_row(_row(rows, "MLPERF-022"))
    l40s = P.map_row(_row(rows, "MLPERF-026"))
    assert h100.distributed["parallel"] == l40s.distributed["parallel"] == "auto"
    assert (h100.distributed["tp_overlap"], h100.distributed["fp8_attention"]) == (True, True)
    assert (l40s.distributed["tp_overlap"], l40s.distributed["fp8_attention"]) == (False, False)
    assert h100.dtype == l40s.dtype == "fp8" and h100.seq == 8192
    amd = dict(_row(rows, "MLPERF-022"), hardware="AMD Instinct MI300X 192GB (MI300X_8)")
    mp = P.map_row(amd)
    assert mp.hardware == "mi300x" and any("non-NVIDIA" in c for c in mp.caveats)
    assert P.map_row(dict(amd, hardware="NVIDIA GB200 (GB200 NVL72)")).hardware == "gb200"
    with pytest.raises(P.Unsupported, match="no profile"):
        P.map_row(dict(amd, hardware="NVIDIA GB300 (GB300 NVL72)"))
