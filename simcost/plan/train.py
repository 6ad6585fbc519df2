"""``simcost plan train``: the search over whole fine-tuning jobs (being written)."""
from __future__ import annotations

DESCRIPTION = "Plan a fine-tuning job."


def add_arguments(p) -> None:
    p.add_argument("--model", required=True)


def run_cli(args) -> int:
    from simcost.errors import SimcostError
    raise SimcostError("plan train is not built yet")
