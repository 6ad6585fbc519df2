"""Element sizes in bytes per storage dtype."""
from __future__ import annotations

BYTES: dict[str, float] = {
    "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1,
    "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "fp64": 8, "c64": 8, "c128": 16,
    # NF4 with double quantisation (QLoRA §2): 4 bits + an fp8 absmax per 64 weights + an fp32
    # constant per 256 absmax blocks = 4.127 bits per weight
    "nf4": 0.5 + 1 / 64 + 4 / (64 * 256),
}
FLOAT_DTYPES = ("fp32", "bf16", "fp16")


def nbytes(dtype: str) -> float:
    return BYTES[dtype]
