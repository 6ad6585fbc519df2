"""``simcost plan serve``: the cheapest fleet that meets a serving SLO (being written)."""
from __future__ import annotations

DESCRIPTION = "Plan a multi-adapter serving fleet."


def add_arguments(p) -> None:
    p.add_argument("--model", required=True)


def run_cli(args) -> int:
    from simcost.errors import SimcostError
    raise SimcostError("plan serve is not built yet")
