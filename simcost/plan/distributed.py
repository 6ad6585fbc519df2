"""Running the plan's groups: on this machine's cores, or as Ray tasks.

Locally (the default) the groups run in ``--jobs N`` processes (default: the CPUs this process
may use; 1 runs them in this process). Each process takes whole profiles, so the segment times
and graphs a profile's groups share are priced once in it. ``--workers N`` starts a local Ray
with N CPUs instead; ``--cluster ADDRESS`` joins a running one (``ray://host:10001``, or
``auto``). Each group is a pure function of its :class:`~simcost.plan.search.Group`, and the
results are put back in the groups' order, so every way of running ranks exactly as one
process does (tests compare them). Ray is the optional ``ray`` extra.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import sys
import tempfile
import warnings

from simcost.errors import SimcostError
from simcost.plan.progress import progress_bar
from simcost.plan.search import Group, GroupResult, evaluate_group


# fewer groups than this run in this process: starting processes would cost more than it saves
MIN_GROUPS_FOR_PROCESSES = 24


def run_groups(groups: list[Group], *, workers: int | None = None, cluster: str | None = None,
               jobs: int | None = None, progress: bool = False) -> list[GroupResult]:
    """The groups' results, in their order. ``jobs``: local processes (None: the usable CPUs
    when there is enough work; 1: this process); ``workers`` / ``cluster``: Ray."""
    if workers is not None and cluster is not None:
        raise SimcostError("give either --workers (a local Ray) or --cluster (a running one)")
    if workers is not None and not 1 <= workers <= 4096:
        raise SimcostError(f"--workers must be in [1, 4096], got {workers}")
    if jobs is not None and not 1 <= jobs <= 4096:
        raise SimcostError(f"--jobs must be in [1, 4096], got {jobs}")
    if jobs is not None and (workers is not None or cluster is not None):
        raise SimcostError("--jobs sets local processes; with --workers or --cluster Ray "
                           "places the work")
    if workers is None and cluster is None:
        n = local_processes(groups, jobs)
        if n > 1:
            return _processes(groups, _by_profile(groups), n, progress)
        return _local(groups, progress)
    return _ray(groups, workers=workers, cluster=cluster, progress=progress)


def local_processes(groups: list[Group], jobs: int | None) -> int:
    """The processes a local run of ``groups`` uses: ``jobs``, or the usable CPUs when there
    are :data:`MIN_GROUPS_FOR_PROCESSES` groups or more; never more than there are profiles."""
    n = min(jobs or usable_cpus(), len(_by_profile(groups)))
    return n if n > 1 and (jobs is not None or len(groups) >= MIN_GROUPS_FOR_PROCESSES) else 1


def where(groups: list[Group], *, workers: int | None, cluster: str | None,
          jobs: int | None) -> str:
    """Where :func:`run_groups` runs the groups, in words."""
    if cluster is not None:
        return f"Ray cluster {cluster}"
    if workers is not None:
        return f"local Ray, {workers} worker(s)"
    n = local_processes(groups, jobs)
    return "this process" if n == 1 else f"{n} local processes"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _by_profile(groups: list[Group]) -> list[list[int]]:
    """The groups' indices by hardware profile, the largest first (a process works through a
    profile's groups with that profile's caches warm)."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g.hardware, []).append(i)
    return sorted(by.values(), key=len, reverse=True)


def _processes(groups: list[Group], chunks: list[list[int]], n: int,
               progress: bool) -> list[GroupResult]:
    # fork where the OS has it (the workers inherit the imported modules; the pool is made
    # before the progress bar starts its thread), spawn elsewhere
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    out: list[GroupResult | None] = [None] * len(groups)
    with multiprocessing.get_context(method).Pool(n) as pool:
        work = pool.imap_unordered(_indexed_chunk, [(c, [groups[i] for i in c]) for c in chunks])
        with progress_bar(progress) as bar:
            task = bar.add_task(f"planning in {n} processes", total=len(groups))
            for idx, results in work:
                for i, r in zip(idx, results):
                    out[i] = r
                bar.advance(task, len(idx))
    return out


@contextlib.contextmanager
def _fd2_silenced():
    """File descriptor 2 (stderr, as native code writes it) sent to a scratch file."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


# seconds to wait for a cluster's port before saying it is unreachable (Ray's own client waits
# about 30 s, retrying)
CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """One line, at once, when a ``ray://host:port`` or ``host:port`` address does not accept
    a connection (``auto`` and the like are left to Ray)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise SimcostError(f"could not reach the Ray cluster at {address}: {why} (is its head "
                           f"running, and the port open from here?)") from None


def _indexed_chunk(item: tuple) -> tuple:
    idx, chunk = item
    return idx, [evaluate_group(g) for g in chunk]


def _local(groups: list[Group], progress: bool) -> list[GroupResult]:
    out = []
    with progress_bar(progress) as bar:
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
        if cluster is not None:
            _check_reachable(cluster)
        try:
            # Ray's own notes (Python warnings, and its C++ core's retry lines written straight
            # to file descriptor 2) would add lines to the one-line error
            with warnings.catch_warnings(), _fd2_silenced():
                warnings.simplefilter("ignore")
                if cluster is not None:
                    ray.init(address=cluster, log_to_driver=False, logging_level=logging.ERROR)
                else:
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.ERROR)
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
        with progress_bar(progress) as bar:
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
