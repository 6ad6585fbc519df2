"""Reading the published-measurements CSV and parsing its free-text fields.

A file that is not a CSV of the expected columns (missing, empty, not UTF-8, a directory, a row
with the wrong number of fields or an impossible measured value) is an error: one line naming
the file and the row. A well-formed row that simcost cannot express is not an error: its
mapper raises :class:`Unsupported` and the report lists it with the reason."""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from simcost.errors import SimcostError
from simcost.paths import data_dir

CSV_NAME = "published_measurements_dev.csv"
GIB = 2 ** 30

# names in the CSV -> simcost names

MODELS = {
    "qwen-1.8b": "qwen-1.8b", "qwen-7b": "qwen-7b", "qwen-14b": "qwen-14b",
    "qwen-72b": "qwen-72b",
    "llama 3.1 8b": "llama-3.1-8b", "llama 3.1 70b": "llama-3.1-70b",
    "llama 3.1 405b": "llama-3.1-405b", "llama 3.2 3b": "llama-3.2-3b",
    "llama-2-7b": "llama-2-7b", "llama-2-7b-chat-hf": "llama-2-7b",
    "llama-2-7b (one layer)": "llama-2-7b",
    "llama-2-70b": "llama-2-70b", "llama-2-70b-hf": "llama-2-70b", "llama-2-70b-chat": "llama-2-70b",
    "mistral-7b-v0.1": "mistral-7b",
}

# (pattern on the lower-cased hardware string, profile, note). First match wins.
HARDWARE = [
    (r"a100-sxm4-80gb|a100 sxm4 80gb", "a100-80gb-sxm", None),
    (r"^(nvidia )?a100 80gb$", "a100-80gb-sxm",
     "form factor not stated; SXM4 assumed (cloud 80 GB A100 nodes are SXM4)"),
    (r"^a100$|^nvidia a100 sxm$", "a100-80gb-sxm",
     "A100 variant not stated; the 80 GB SXM4 part is assumed (the run peaks above 40 GB)"),
    (r"^nvidia a100 pcie$", "a100-80gb-pcie", None),
    (r"^rtx 4090$", "rtx-4090", None),
    (r"^rtx a6000$", "rtx-a6000", None),
    (r"^h100 80gb$|^h100 sxm 80gb$|^nvidia h100 sxm$", "h100-sxm", None),
    (r"^h200 sxm 141gb$|^nvidia h200 sxm$", "h200", None),
    (r"^b200 180gb$|^nvidia b200 sxm$", "b200", None),
    (r"^amd mi300x$", "mi300x", None),
]

# the columns the mappers read (the dev CSV has a `source` column too, which they do not)
REQUIRED_COLUMNS = ("id", "source_locator", "model", "method", "peft_config", "precision",
                    "quantization", "batch_size", "seq_len", "grad_ckpt", "optimizer",
                    "hardware", "n_devices", "metric", "value", "notes")
MAX_CSV_BYTES = 64 * 2 ** 20      # the dev CSV is ~0.2 MB


class Unsupported(Exception):
    """A row simcost cannot express yet (the message is the one-line reason)."""


def source_of(row_id: str) -> str:
    return row_id.rsplit("-", 1)[0]


# ---------------------------------------------------------------------------------------------
# reading


def default_csv() -> Path:
    """The repo's copy (validation/published/), or the one a wheel carries (_data/published/)."""
    repo = data_dir("validation") / "published" / CSV_NAME
    return repo if repo.is_file() else data_dir("published") / CSV_NAME


def load_rows(path: str | Path | None = None) -> list[dict]:
    """The CSV's rows as dicts of strings, every required column present in each."""
    p = Path(path) if path is not None else default_csv()
    text = _read_text(p)
    if not text.strip():
        raise SimcostError(f"'{p}' is empty: no header row")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        _check_columns(p, header)
        rows = [_checked_row(p, reader.line_num, header, fields) for fields in reader if fields]
    except csv.Error as e:
        raise SimcostError(f"'{p}', line {reader.line_num}: not a valid CSV ({e})") from None
    if not rows:
        raise SimcostError(f"'{p}' has a header but no rows")
    _check_ids(p, rows)
    return rows


def _read_text(p: Path) -> str:
    if not p.exists():
        raise SimcostError(f"no published-measurements CSV at '{p}'")
    if p.is_dir():
        raise SimcostError(f"'{p}' is a directory, not a CSV file")
    if not p.is_file():
        raise SimcostError(f"'{p}' is not a regular file")
    size = p.stat().st_size
    if size > MAX_CSV_BYTES:
        raise SimcostError(f"'{p}' is {size / 2 ** 20:.0f} MiB; a published-measurements CSV "
                           f"is at most {MAX_CSV_BYTES // 2 ** 20} MiB")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SimcostError(f"cannot read '{p}': {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SimcostError(f"'{p}' is not UTF-8 text (byte 0x{data[e.start]:02x} on line "
                           f"{line})") from None


def _check_columns(p: Path, header: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise SimcostError(f"'{p}' lacks the column{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(missing)} (required: {', '.join(REQUIRED_COLUMNS)})")
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise SimcostError(f"'{p}' names the column{'s' if len(twice) > 1 else ''} "
                           f"{', '.join(twice)} twice")


def _checked_row(p: Path, line: int, header: list[str], fields: list[str]) -> dict:
    where = f"'{p}', line {line}"
    if len(fields) != len(header):
        raise SimcostError(f"{where}: {len(fields)} fields, the header has {len(header)}")
    row = dict(zip(header, fields))
    rid = row["id"].strip()
    if not rid:
        raise SimcostError(f"{where}: empty id")
    raw = row["value"].strip()
    try:
        v = float(raw)
    except ValueError:
        return row          # a range or OOM: the row is listed as unsupported (metric_value)
    if not _measurable(v):
        raise SimcostError(f"{where} (row {rid}): value '{raw}' is not a positive finite "
                           "measurement")
    return row


def _measurable(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _check_ids(p: Path, rows: list[dict]) -> None:
    seen, twice = set(), []
    for r in rows:
        if r["id"] in seen and r["id"] not in twice:
            twice.append(r["id"])
        seen.add(r["id"])
    if twice:
        raise SimcostError(f"'{p}' repeats the row id{'s' if len(twice) > 1 else ''} "
                           f"{', '.join(twice[:5])}{' ...' if len(twice) > 5 else ''}")


# ---------------------------------------------------------------------------------------------
# fields

def first_int(text: str) -> int | None:
    """The first run of digits in ``text`` ('8x A100' -> 8), or None."""
    m = re.search(r"\d+", text or "")
    return int(m.group()) if m else None


def parse_batch(text: str) -> tuple[int | None, int]:
    """'1 (GA 8)' -> (1, 8); '2' -> (2, 1); '' -> (None, 1)."""
    ga = re.search(r"GA\s*(\d+)", text or "")
    return first_int(text), int(ga.group(1)) if ga else 1


def model_name(text: str) -> str | None:
    return MODELS.get((text or "").strip().lower())


def hardware_name(text: str) -> tuple[str | None, str | None]:
    t = (text or "").strip().lower()
    for pat, name, note in HARDWARE:
        if re.search(pat, t):
            return name, note
    return None, None


def parse_lora(text: str) -> dict:
    """'r=64 alpha=16 dropout=0.05 targets c_attn,c_proj,w1,w2' -> r, alpha, dropout, targets."""
    out = {}
    for key, pat in (("r", r"\br\s*=\s*(\d+)"), ("alpha", r"\b(?:alpha|a)\s*=\s*([\d.]+)"),
                     ("dropout", r"dropout\s*=\s*([\d.]+)")):
        m = re.search(pat, text or "")
        if m:
            out[key] = float(m.group(1)) if key != "r" else int(m.group(1))
    m = re.search(r"targets\s+([\w.,]+)", text or "")
    if m:
        out["targets"] = tuple(t for t in m.group(1).split(",") if t)
    return out


def metric_value(row: dict) -> tuple[str, float, str]:
    """(kind, value in SI units, unit note) of the row's metric; Unsupported when the metric
    is not one simcost predicts."""
    metric, raw = row["metric"], row["value"].strip()
    try:
        v = float(raw)
    except ValueError:
        raise Unsupported(f"value '{raw}' is not a number (a range or OOM)") from None
    if not _measurable(v):      # load_rows refuses such a file; a row given directly
        raise Unsupported(f"value '{raw}' is not a positive finite measurement")
    if metric == "step_time_s":
        return "step_time", v, "s per optimizer step"
    if metric == "iterations_per_s":
        return "step_time", 1.0 / v, "s per step (1 / it/s)"
    if metric == "tokens_per_s":
        return "tokens_per_s", v, "tokens/s"
    if metric in ("peak_mem_GiB_per_gpu", "peak_mem_active_GiB"):
        return "memory", v * GIB, "GiB"
    if metric in ("mem_GB", "peak_gpu_mem_GB", "peak_mem_GB", "peak_mem_GB_per_gpu",
                  "peak_mem_reserved_GB", "mem_GB_total_all_gpus"):
        return "memory", v * GIB, "GB read as GiB"
    if metric == "latency_ms":
        return "op_latency", v * 1e-3, "ms"
    raise Unsupported(f"metric '{metric}' is not a single-device training or op quantity")

