"""Reading the JSON files users hand in (model configs, adapter configs, hardware profiles).

One line for every way a file can be unreadable: missing, too big, not UTF-8, malformed,
nested absurdly deep, or (for :func:`read_json_object`) not a JSON object.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from simcost.errors import SimcostError, unknown

if TYPE_CHECKING:
    from pydantic import ValidationError

MAX_BYTES = 16 * 2 ** 20     # a config or profile is kilobytes; refuse what is not one


def read_json(path: str | Path, what: str = "file", max_bytes: int = MAX_BYTES):
    """The JSON value of a file (a UTF-8 byte-order mark is allowed, as peft writes none but
    editors do)."""
    file = Path(path)
    try:
        if file.stat().st_size > max_bytes:
            raise SimcostError(f"{file} is larger than {max_bytes // 2 ** 20} MiB: not a {what}")
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SimcostError(f"{what} {file} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SimcostError(f"cannot read {what} {file}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SimcostError(f"malformed JSON in {file}: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise SimcostError(f"{what} {file} is nested too deeply to be a {what}") from None


def read_json_object(path: str | Path, what: str = "file", max_bytes: int = MAX_BYTES) -> dict:
    data = read_json(path, what, max_bytes)
    if not isinstance(data, dict):
        raise SimcostError(f"{Path(path)} is not a JSON object")
    return data


def profile_file(ref: str, folder: Path, what: str, names) -> tuple[str, str, bool]:
    """Where the profile ``ref`` names lives: (absolute file, how to show it, bundled?).

    ``ref`` is a bundled name (``folder/<ref>.json``) or a path (it ends in ``.json``, holds a
    ``/``, or exists). An empty name, a missing file or an unknown name is one line, the last
    with the nearest of ``names()``."""
    if not isinstance(ref, str) or not ref.strip():
        raise SimcostError(f"{what} must name a {what} profile or a profile file")
    p = Path(ref)
    if p.suffix == ".json" or "/" in ref or p.exists():
        if not p.is_file():
            raise SimcostError(f"no {what} profile file at '{ref}'")
        return str(p.resolve()), ref, False
    file = folder / f"{ref}.json"
    if not file.is_file():
        raise unknown(what, ref, names())
    return str(file), f"{ref}.json", True


_BOUND = {"greater_than": ("gt", "must be > {}"), "greater_than_equal": ("ge", "must be >= {}"),
          "less_than_equal": ("le", "must be <= {}"), "less_than": ("lt", "must be < {}")}


def describe_error(e: ValidationError) -> str:
    """'memory_bytes.value must be > 0, got -1': the first problem, its field path and value."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "the top level"
    kind, got = err["type"], err.get("input")
    if kind in _BOUND:
        key, text = _BOUND[kind]
        msg = text.format(err["ctx"][key])
    elif kind == "finite_number":
        msg = "must be a finite number"
    elif kind == "extra_forbidden":
        return f"unknown field {loc}"
    elif kind == "missing":
        return f"{loc} is missing"
    else:
        msg = err["msg"].replace("Value error, ", "").replace("Input should be ", "must be ")
        if kind == "value_error" and (not err["loc"] or isinstance(got, dict)):
            return f"{loc} {msg}" if err["loc"] else msg   # the message names what is wrong
    shown = json.dumps(got) if isinstance(got, (int, float, str)) and not isinstance(got, bool) \
        else str(got)
    if isinstance(got, float) and not math.isfinite(got):
        shown = str(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    hint = ""
    if loc.startswith("interconnect.bandwidth") and got == 0:
        hint = ' (a device without a device-to-device link has "interconnect": null)'
    return f"{loc} {msg}, got {shown}{hint}"


def load_validated(cls, data, what: str, shown: str, context: dict | None = None):
    """``cls.model_validate(data)`` (a pydantic model of a profile file), every failure one
    line naming the file and the first bad field; ``context`` goes to the model's validators."""
    from pydantic import ValidationError
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as e:
        raise SimcostError(f"invalid {what} {shown}: {describe_error(e)}") from None
    except RecursionError:
        raise SimcostError(f"{what} {shown} is nested too deeply to be a {what}") from None
