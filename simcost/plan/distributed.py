"""Running the plan's groups: here, one after another, or as Ray tasks.

``--workers N`` starts a local Ray with N CPUs; ``--cluster ADDRESS`` joins a running one
(``ray://host:10001``, or ``auto``). Each group is a pure function of its
:class:`~simcost.plan.search.Group`, and the results are put back in the groups' order, so a
Ray run ranks exactly as a local one. Ray is the optional ``ray`` extra.
"""
from __future__ import annotations

import sys

from simcost.errors import SimcostError
from simcost.plan.search import Group, GroupResult, evaluate_group


def run_groups(groups: list[Group], *, workers: int | None = None, cluster: str | None = None,
               progress: bool = False) -> list[GroupResult]:
    if workers is not None and cluster is not None:
        raise SimcostError("give either --workers (a local Ray) or --cluster (a running one)")
    if workers is not None and not 1 <= workers <= 4096:
        raise SimcostError(f"--workers must be in [1, 4096], got {workers}")
    if workers is None and cluster is None:
        return _local(groups, progress)
    return _ray(groups, workers=workers, cluster=cluster, progress=progress)


def _bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(file=sys.stderr), transient=True, disable=not enabled)


def _local(groups: list[Group], progress: bool) -> list[GroupResult]:
    out = []
    with _bar(progress) as bar:
        task = bar.add_task("planning", total=len(groups))
        for g in groups:
            out.append(evaluate_group(g))
            bar.advance(task)
    return out


def _ray(groups: list[Group], *, workers: int | None, cluster: str | None,
         progress: bool) -> list[GroupResult]:
    try:
        import ray
    except ImportError:
        raise SimcostError("--workers and --cluster need Ray: pip install 'simcost[ray]'") \
            from None
    started = False
    if not ray.is_initialized():
        try:
            if cluster is not None:
                ray.init(address=cluster, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            started = True
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = cluster if cluster is not None else f"a local Ray with {workers} workers"
            raise SimcostError(f"could not start {where}: {str(e).splitlines()[0]}") from None
    try:
        remote = ray.remote(evaluate_group)
        refs = [remote.remote(g) for g in groups]
        index = {r: i for i, r in enumerate(refs)}
        out: list[GroupResult | None] = [None] * len(refs)
        pending = list(refs)
        with _bar(progress) as bar:
            task = bar.add_task("planning on Ray", total=len(refs))
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    out[index[ref]] = ray.get(ref)
                bar.advance(task, len(done))
        return out
    finally:
        if started:
            ray.shutdown()
