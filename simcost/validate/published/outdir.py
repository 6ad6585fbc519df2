"""Where ``simcost validate published`` and ``simcost validate steps`` write their report files
by default: the checkout's ``validation/reports``, found beside the package as
:func:`simcost.paths.data_dir` finds the data folders, never the current directory. An
installed package has no checkout; there nothing is written unless ``--out-dir`` names a folder.
"""
from __future__ import annotations

from pathlib import Path

from simcost.errors import SimcostError
from simcost.paths import data_dir

OUT_DIR_HELP = ("folder for the report files (default: the checkout's validation/reports; "
                "an installed simcost writes none without --out-dir)")
NOT_WRITTEN = ("no checkout's validation/reports beside the installed package: report files "
               "are not written; pass --out-dir DIR to write them")


def checkout_reports_dir() -> Path | None:
    """``validation/reports`` of the checkout the package runs from, or None (a wheel)."""
    d = data_dir("validation")
    return d / "reports" if (d / "published").is_dir() else None


def resolve_out_dir(out_dir: str | None) -> Path | None:
    """The folder to write: ``--out-dir`` as given, else the checkout's reports folder, else
    None (write nothing, and say :data:`NOT_WRITTEN`)."""
    if out_dir is not None:
        if not str(out_dir).strip():
            raise SimcostError("--out-dir: empty path; name a folder")
        return Path(out_dir)
    return checkout_reports_dir()


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SimcostError(f"--out-dir '{out}': cannot create the folder "
                           f"({e.strerror or e})") from None
