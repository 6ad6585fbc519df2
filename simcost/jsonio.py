"""Reading the JSON files users hand in (model configs, adapter configs, hardware profiles).

One line for every way a file can be unreadable: missing, too big, not UTF-8, malformed,
nested absurdly deep, or (for :func:`read_json_object`) not a JSON object.
"""
from __future__ import annotations

import json
from pathlib import Path

from simcost.errors import SimcostError

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
    from simcost.errors import unknown
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
