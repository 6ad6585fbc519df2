"""Where the bundled data lives: beside the package in a checkout (or editable install), or
inside it in a wheel."""
from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for cand in (_PKG.parent / name, _PKG / "_data" / name):
        if cand.is_dir():
            return cand
    return _PKG.parent / name


def check_output_file(path, option: str) -> Path:
    """``path`` as a file a command may write (``option`` names it in the message): refused in
    one line when it is a folder, its folder does not exist, or it cannot be written. Checked
    before a command's work starts, not after."""
    from simcost.errors import SimcostError
    p = Path(path).expanduser()
    if p.is_dir():
        raise SimcostError(f"{option} {path} is a folder; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SimcostError(f"{option} {path}: the folder {parent} does not exist")
    if p.exists() and not os.access(p, os.W_OK) or not p.exists() and \
            not os.access(parent, os.W_OK | os.X_OK):
        raise SimcostError(f"{option} {path}: not writable")
    return p
