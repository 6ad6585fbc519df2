"""``simcost plan train`` and ``simcost plan serve``: the parsers and their dispatch."""
from __future__ import annotations


def add_commands(sub, parser_class) -> None:
    """The ``plan`` command and its two sub-commands."""
    plan = sub.add_parser("plan", help="search hardware, devices, plans and methods for a whole "
                                       "job (train) or a serving SLO (serve)")
    plan_sub = plan.add_subparsers(dest="what", required=True, parser_class=parser_class)
    from simcost.plan import serve, train
    train.add_arguments(plan_sub.add_parser(
        "train", help="the plans that fit a fine-tuning job, its time, cost and energy",
        description=train.DESCRIPTION))
    serve.add_arguments(plan_sub.add_parser(
        "serve", help="the cheapest fleet that meets a serving SLO at a request rate",
        description=serve.DESCRIPTION))


def dispatch(args) -> int:
    from simcost.plan import serve, train
    return (train if args.what == "train" else serve).run_cli(args)
