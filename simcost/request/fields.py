"""Shared field types and parsers for the request objects.

Every number a user can give passes through one of these: integers are integers (not bools,
not 2.5), floats are finite, and every size has a stated range. A violation becomes one
:class:`~simcost.errors.SimcostError` line naming the option and the bad value.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator)

from simcost.errors import SimcostError

# Upper bounds: far beyond any real job, small enough that the arithmetic stays finite and the
# work bounded (a sweep or simulation never allocates per unit of these).
MAX_BATCH = 10 ** 7
MAX_SEQ = 10 ** 8
MAX_DEVICES = 10 ** 6
MAX_RANK = 10 ** 6
MAX_VIRTUAL_TOKENS = 10 ** 6       # prefix / prompt tuning
MAX_REQUESTS = 10 ** 7             # simulated requests (rate x duration, a trace's rows)
MAX_IMAGE = 10 ** 5                # pixels per image side

PosInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
Batch = Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)]
Seq = Annotated[StrictInt, Field(ge=1, le=MAX_SEQ)]
ImageSize = Annotated[StrictInt, Field(ge=1, le=MAX_IMAGE)]
Devices = Annotated[StrictInt, Field(ge=1, le=MAX_DEVICES)]
Rank = Annotated[StrictInt, Field(ge=1, le=MAX_RANK)]
FinitePos = Annotated[float, Field(gt=0, allow_inf_nan=False)]
FiniteNonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]   # dropout
Flag = StrictBool


def int_like(v: Any) -> Any:
    """Accept 8 and 8.0 (JSON, numpy) as the integer 8; leave everything else to the type."""
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0:
        return int_like(v.item())
    return v


class Request(BaseModel):
    """Base of every request: unknown fields refused, values checked on construction."""
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("*", mode="before")
    @classmethod
    def _ints(cls, v):
        return int_like(v)

    @classmethod
    def option_name(cls, field: str) -> str:
        """'micro_batch' -> '--micro-batch' (how the CLI spells a request field)."""
        return "--" + field.replace("_", "-")

    @classmethod
    def build(cls, **kw):
        """Construct, turning pydantic's report into one line naming the first bad field."""
        try:
            return cls(**kw)
        except ValidationError as e:
            raise SimcostError(describe(e, cls.option_name)) from None


_PHRASES = (("Input should be ", "must be "), ("Value error, ", ""), ("Assertion failed, ", ""),
            ("greater than or equal to ", ">= "), ("less than or equal to ", "<= "),
            ("greater than ", "> "), ("less than ", "< "))


def describe(e: ValidationError, option_name=Request.option_name) -> str:
    err = e.errors()[0]
    msg = err["msg"]
    for a, b in _PHRASES:
        msg = msg.replace(a, b)
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
    if not loc:                      # a check across fields: its message says it all
        return msg
    name = option_name(loc[0])
    if len(loc) > 1:
        name += " (" + ".".join(loc[1:]) + ")"
    if err["type"] == "extra_forbidden":
        return f"unknown option {name}"
    got = err.get("input")
    if isinstance(got, (tuple, list)) and err["type"] == "value_error":
        return f"{name} {msg}"       # a list's own check names the bad item in its message
    shown = repr(got) if isinstance(got, str) else str(got)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{name} {msg}, got {shown}"


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNIT_S = {None: 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration_s(text: str | float | int, what: str = "--duration") -> float:
    """'90s', '10m', '1h', '250ms' or a plain number of seconds -> seconds (finite, > 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        v = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise SimcostError(f"{what} must be a duration such as 90s, 10m or 1h, got '{text}'")
        v = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not math.isfinite(v) or v <= 0:
        raise SimcostError(f"{what} must be a finite duration > 0, got '{text}'")
    return v


def _pos_int(text: str, what: str) -> int:
    t = text.strip()
    if not re.fullmatch(r"\+?[0-9]+", t):
        raise SimcostError(f"{what} expects positive integers, got '{text}'")
    v = int(t)
    if v < 1:
        raise SimcostError(f"{what} expects positive integers, got '{text}'")
    return v


def parse_len_range(text: str | int | tuple, what: str = "--input-len") -> tuple[int, int]:
    """'512' -> (512, 512); '8:512' -> (8, 512): a length or an inclusive MIN:MAX range."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if isinstance(text, (tuple, list)):
        if len(text) != 2:
            raise SimcostError(f"{what} must be N or MIN:MAX, got {text!r}")
        lo, hi = (_pos_int(str(x), what) for x in text)
    else:
        parts = str(text).split(":")
        if len(parts) == 1:
            lo = hi = _pos_int(parts[0], what)
        elif len(parts) == 2:
            lo, hi = _pos_int(parts[0], what), _pos_int(parts[1], what)
        else:
            raise SimcostError(f"{what} must be N or MIN:MAX, got '{text}'")
    if lo > hi:
        raise SimcostError(f"{what}: MIN {lo} is above MAX {hi}")
    return lo, hi


def parse_int_list(text: str | int | list | tuple, what: str) -> tuple[int, ...]:
    """'8,16' (or a list) -> (8, 16): positive integers, at least one."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = [text]
    items = [str(x) for x in text] if isinstance(text, (list, tuple)) else str(text).split(",")
    vals = tuple(_pos_int(x, what) for x in items if str(x).strip())
    if not vals:
        raise SimcostError(f"{what} needs at least one value")
    return vals
