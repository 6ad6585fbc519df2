"""Reading the JSON files users hand in (model configs, adapter configs, hardware profiles).

One line for every way a file can be unreadable: missing, not UTF-8, malformed, nested
absurdly deep, or not a JSON object.
"""
from __future__ import annotations

import json
from pathlib import Path

from simcost.errors import SimcostError

MAX_BYTES = 64 * 2 ** 20     # a config or profile is kilobytes; refuse what is not one


def read_json_object(path: str | Path, what: str = "file") -> dict:
    file = Path(path)
    try:
        if file.stat().st_size > MAX_BYTES:
            raise SimcostError(f"{what} {file} is larger than {MAX_BYTES // 2 ** 20} MiB")
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SimcostError(f"{what} {file} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SimcostError(f"cannot read {what} {file}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SimcostError(f"malformed JSON in {file}: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise SimcostError(f"{what} {file} is nested too deeply to be a {what}") from None
    if not isinstance(data, dict):
        raise SimcostError(f"{file} is not a JSON object")
    return data
