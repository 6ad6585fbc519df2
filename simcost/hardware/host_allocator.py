"""The host (CPU) allocator: which one a process uses, which blocks it gives back to the OS, and
what faulting a fresh block in costs.

On a CPU, torch takes every tensor from the C allocator (``posix_memalign``). Allocators differ
in what they do with a large freed block:

- glibc malloc serves a request of at least ``M_MMAP_THRESHOLD`` with its own ``mmap`` and
  ``munmap``s it on free. The threshold starts at 128 KiB and is dynamic: freeing an mmapped
  block raises it to that block's size, up to ``DEFAULT_MMAP_THRESHOLD_MAX`` = 32 MiB on 64-bit
  systems (``mallopt(3)``, M_MMAP_THRESHOLD; glibc malloc/malloc.c). ``MALLOC_MMAP_THRESHOLD_``
  (or the tunable ``glibc.malloc.mmap_threshold``) fixes it instead. So in a training loop every
  allocation of more than 32 MiB is a fresh mapping whose pages fault in again on first touch.
- jemalloc (5.2 and later) puts allocations above ``opt.oversize_threshold`` (8 MiB by
  default, ``MALLOC_CONF=oversize_threshold:N``) into a dedicated arena purged immediately
  (jemalloc(3), opt.oversize_threshold): the same effect from 8 MiB up.
- tcmalloc keeps freed spans in its page heap and returns them slowly (gperftools
  ``TCMALLOC_RELEASE_RATE``): no fault per step. mimalloc: not characterised here (no
  documented threshold); a calibration under it measures its behaviour.

``simcost calibrate`` (:func:`measure`) detects the allocator of the calibrating process
(:func:`detect`), measures the page-fault cost (bytes per second of extra time to first-touch a
fresh anonymous mapping, written by torch as a kernel writes its output) and the size from which
the allocator's blocks come back fresh (torch tensors allocated and freed in a loop, as a
training step does), and writes ``time_model.host_allocator``, ``fresh_alloc_bytes_per_s`` and
``host_alloc_return_threshold_bytes``. The time model prices those faults with
:func:`resolve` (see :mod:`simcost.sim.page_faults`).

Which allocator an estimate assumes: the one the profile was calibrated under, named in a
warning of every CPU estimate, unless the user states the training process's one
(``--host-allocator`` on ``simcost estimate train``, ``host_allocator=`` in the API). The
estimating process's own allocator is no evidence (simcost does not load torch, and the
training job usually runs elsewhere), whereas the calibration's is what every other number of
the profile was measured under. A stated allocator other than the calibration's takes its
documented threshold and the profile's measured fault cost (a property of the OS and the
machine, measured on an anonymous mapping whatever the allocator). A profile without these
fields (datasheet profiles, older calibrations) prices no faults, as before.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass


ALLOCATORS = ("glibc", "tcmalloc", "jemalloc", "mimalloc")
MIB = 1 << 20
# glibc malloc/malloc.c: DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long) (64-bit)
GLIBC_MMAP_THRESHOLD_MAX_BYTES = 32 * MIB
# jemalloc(3) opt.oversize_threshold, default 8 MiB (jemalloc 5.2+)
JEMALLOC_OVERSIZE_THRESHOLD_BYTES = 8 * MIB
_LIBS = (("tcmalloc", "libtcmalloc"), ("jemalloc", "libjemalloc"), ("mimalloc", "libmimalloc"))
SHARE = 0.03                   # of the calibration budget
MIN_STAGE_S = 1.0
FAULT_PROBE_BYTES = 64 * MIB


def detect(maps_text: str | None = None, environ=None) -> str:
    """The allocator of this process: glibc, tcmalloc, jemalloc, mimalloc, or 'unknown'
    (no /proc, musl, a static build). An allocator library mapped into the process (from
    ``/proc/self/maps``) or named in ``LD_PRELOAD`` wins over glibc's malloc, which is used
    when libc.so.6 is mapped and no other allocator is."""
    env = os.environ if environ is None else environ
    if maps_text is None:
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                maps_text = f.read()
        except OSError:
            maps_text = ""
    mapped = {os.path.basename(line.split()[-1]) for line in maps_text.splitlines()
              if len(line.split()) >= 6}
    preload = str(env.get("LD_PRELOAD", ""))
    for name, lib in _LIBS:
        if any(m.startswith(lib) for m in mapped) or lib in preload:
            return name
    if any(re.fullmatch(r"libc(\.so\.6|-2\.\d+\.so)", m) for m in mapped):
        return "glibc"
    return "unknown"


def _size(text: str) -> float | None:
    """A byte count from an environment setting ('33554432'), None when not a number."""
    try:
        v = float(str(text).strip())
    except ValueError:
        return None
    return v if v >= 0 else None


def documented_threshold_bytes(allocator: str, environ=None) -> float | None:
    """The smallest block ``allocator`` returns to the OS on free (so that it faults in again
    when allocated), from its documentation and the process environment; None: it keeps freed
    blocks (tcmalloc) or nothing is documented (mimalloc, unknown)."""
    env = os.environ if environ is None else environ
    if allocator == "glibc":
        fixed = _size(env.get("MALLOC_MMAP_THRESHOLD_", "x"))
        m = re.search(r"glibc\.malloc\.mmap_threshold=(\d+)", str(env.get("GLIBC_TUNABLES", "")))
        if m:
            fixed = float(m.group(1))
        return fixed if fixed is not None else float(GLIBC_MMAP_THRESHOLD_MAX_BYTES)
    if allocator == "jemalloc":
        m = re.search(r"oversize_threshold:(\d+)", str(env.get("MALLOC_CONF", "")))
        return float(m.group(1)) if m else float(JEMALLOC_OVERSIZE_THRESHOLD_BYTES)
    return None


# -- the time model's view ---------------------------------------------------------------------

@dataclass(frozen=True)
class AllocPolicy:
    """What the time model assumes about the training process's allocator: blocks of at least
    ``threshold_bytes`` fault in fresh at ``fault_bytes_per_s`` (None: no such cost)."""
    allocator: str | None
    threshold_bytes: float | None
    fault_bytes_per_s: float | None
    note: str | None = None

    @property
    def active(self) -> bool:
        return self.threshold_bytes is not None and bool(self.fault_bytes_per_s)


NO_POLICY = AllocPolicy(None, None, None)


def check_allocator(name: str | None) -> str | None:
    """A stated allocator name, checked (one line naming the valid ones otherwise)."""
    if name is None or name in ALLOCATORS:
        return name
    from simcost.errors import unknown
    raise unknown("host allocator", str(name), list(ALLOCATORS))


def resolve(params, kind: str, stated: str | None = None) -> AllocPolicy:
    """The allocator policy of a device's time model (``params``: TimeModelParams) for a
    training process using ``stated`` (None: the calibration's allocator, said in the note).
    Only CPU devices; a profile without ``host_allocator`` keeps today's numbers (no term)
    unless an allocator is stated."""
    stated = check_allocator(stated)
    if kind != "cpu":
        return NO_POLICY
    calibrated = params.host_allocator
    name = stated or calibrated
    if name is None or name == "unknown":
        return NO_POLICY
    rate = params.fresh_alloc_bytes_per_s
    if name == calibrated:
        threshold = params.host_alloc_return_threshold_bytes
    else:
        threshold = documented_threshold_bytes(name, environ={})
    if rate is None:
        note = (f"host allocator {name}: the profile has no measured page-fault cost "
                f"(time_model.fresh_alloc_bytes_per_s, written by 'simcost calibrate'), so "
                f"fresh large blocks are not priced") if threshold is not None else None
        return AllocPolicy(name, None, None, note)
    note = None
    if stated is not None and calibrated not in (None, "unknown", stated):
        note = (f"host allocator {stated} stated, the profile calibrated under {calibrated}: "
                f"page faults priced for {stated}, but the host time per kernel "
                f"(dispatch_s) is {calibrated}'s, and malloc's own cost differs between them "
                f"(steps 15-20 % apart between glibc and tcmalloc on a 2-vCPU EPYC); "
                f"calibrate under {stated} to measure it")
    if stated is None:
        what = (f"returns blocks of {threshold / MIB:.0f} MiB and more to the OS, priced as "
                f"page faults" if threshold is not None else "keeps freed blocks: no page "
                                                             "faults priced")
        note = (f"CPU step assumes the host allocator of the calibration, {name} ({what}); "
                f"pass --host-allocator glibc|tcmalloc|jemalloc if training runs under another")
    return AllocPolicy(name, threshold, rate, note)


# -- calibration -------------------------------------------------------------------------------

def _best(fn, reps: int, deadline: float) -> float:
    """Minimum seconds of ``fn`` over ``reps`` calls (after one warm call), fewer past the
    deadline (noise on a shared machine only ever adds time)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return best


def _minor_faults() -> int | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError, AttributeError):
        return None


def fault_rate_bytes_per_s(nbytes: int, deadline: float, reps: int = 5) -> float | None:
    """Bytes per second of extra time to first-touch a fresh anonymous mapping (the kernel's
    page faults), written with torch's ``fill_`` on its threads, against writing a warm buffer
    of the same size. Independent of the allocator, so a calibration under tcmalloc measures
    it too."""
    import mmap

    import torch

    n = nbytes // 4
    warm = torch.empty(n)
    warm.fill_(0.0)

    # a private mapping, as malloc's mmap (Python's default, MAP_SHARED, faults in shmem pages)
    flags = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") \
        else {}

    def fresh():
        m = mmap.mmap(-1, n * 4, **flags)
        t = torch.frombuffer(m, dtype=torch.float32, count=n)
        t.fill_(1.0)
        del t
        m.close()

    t_fresh = _best(fresh, reps, deadline)
    t_warm = _best(lambda: warm.fill_(1.0), reps, deadline)
    extra = t_fresh - t_warm
    return nbytes / extra if extra > 0 else None


def ladder(allocator: str) -> list[int]:
    """Block sizes to try (bytes): a spread from 4 to 128 MiB and the documented threshold's
    two sides (1 MiB below and above), so that a measured threshold can confirm it."""
    sizes = {4 * MIB, 16 * MIB, 64 * MIB, 128 * MIB}
    doc = documented_threshold_bytes(allocator)
    if doc is not None and doc >= 2 * MIB:
        sizes |= {int(doc) - MIB, int(doc) + MIB}
    return sorted(sizes)


def returned_sizes(sizes, rate: float | None, deadline: float, reps: int = 4) -> list[dict]:
    """Per size: whether a torch tensor allocated, written and freed in a loop comes back
    fresh each time (its pages fault again: minor faults >= half its pages where the OS
    counts them, else extra time >= half the predicted fault time)."""
    import torch

    rows = []
    for nbytes in sizes:
        if time.perf_counter() > deadline:
            break
        n = nbytes // 4
        warm = torch.empty(n)
        warm.fill_(0.0)
        t_warm = _best(lambda: warm.fill_(1.0), reps, deadline)
        del warm
        for _ in range(2):           # the first blocks of a size also raise glibc's threshold
            torch.empty(n).fill_(1.0)
        f0 = _minor_faults()
        t_fresh = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.empty(n).fill_(1.0)
            t_fresh = min(t_fresh, time.perf_counter() - t)
        f1 = _minor_faults()
        faults = (f1 - f0) / reps if f0 is not None and f1 is not None else None
        if faults is not None:
            back = faults >= 0.5 * nbytes / 4096
        else:
            back = rate is not None and t_fresh - t_warm >= 0.5 * nbytes / rate
        rows.append({"bytes": nbytes, "warm_s": t_warm, "fresh_s": t_fresh,
                     "minor_faults_per_alloc": faults, "returned": bool(back)})
    return rows


def threshold_from_rows(rows: list[dict], allocator: str) -> tuple[float | None, str]:
    """The return threshold the ladder shows, and how it was found. Sizes from the largest
    down that all came back fresh form the returned range (glibc's heap may also fault a
    smaller block now and then, below its mmap threshold: not a threshold); its smallest size
    is the threshold, or the documented one when the ladder brackets it (largest kept <
    documented <= smallest returned). None when the largest size was kept."""
    if not rows:
        return None, "not measured"
    lo = None
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        if not r["returned"]:
            break
        lo = r["bytes"]
    if lo is None:
        return None, (f"freed blocks kept: no block of {rows[0]['bytes'] // MIB}-"
                      f"{rows[-1]['bytes'] // MIB} MiB came back fresh")
    kept = max((r["bytes"] for r in rows if r["bytes"] < lo), default=0)
    doc = documented_threshold_bytes(allocator)
    if doc is not None and kept < doc <= lo:
        return float(doc), (f"documented threshold {doc / MIB:g} MiB, confirmed: "
                            f"{kept / MIB:g} MiB blocks kept, {lo / MIB:g} MiB returned")
    return float(lo), (f"smallest of the measured blocks returned from there up: {lo / MIB:g} "
                       f"MiB (next smaller, kept: {kept / MIB:g} MiB)")


def measure(budget=None) -> dict:
    """The calibration stage: allocator, fault rate, per-size return behaviour (raw)."""
    allocator = detect()
    total = getattr(budget, "total_s", 150.0)
    left = budget.left_s() if budget is not None else 10.0
    if min(SHARE * total, left) < MIN_STAGE_S:
        if budget is not None:
            budget.skip("host allocator (budget)")
        return {"allocator": allocator}
    deadline = time.perf_counter() + min(SHARE * total, left)
    rate = fault_rate_bytes_per_s(FAULT_PROBE_BYTES, deadline, reps=7)
    rows = returned_sizes(ladder(allocator), rate, deadline)
    threshold, how = threshold_from_rows(rows, allocator)
    return {"allocator": allocator, "fault_bytes_per_s": rate, "sizes": rows,
            "threshold_bytes": threshold, "threshold_note": how,
            "ld_preload": os.environ.get("LD_PRELOAD", "")}


def profile_fields(raw: dict | None, q) -> dict:
    """The time-model entries of a calibration's allocator stage (``q(value, note)`` makes a
    sourced quantity)."""
    if not raw or raw.get("allocator") is None:
        return {}
    out = {"host_allocator": q(raw["allocator"], "detected from /proc/self/maps and LD_PRELOAD "
                                                 "of the calibrating process")}
    if raw.get("fault_bytes_per_s"):
        out["fresh_alloc_bytes_per_s"] = q(
            raw["fault_bytes_per_s"], f"extra time to first-touch a fresh "
                                      f"{FAULT_PROBE_BYTES // MIB} MiB anonymous mapping "
                                      f"(torch fill_) vs a warm buffer: page-fault cost")
    if raw.get("threshold_bytes"):
        out["host_alloc_return_threshold_bytes"] = q(raw["threshold_bytes"],
                                                     raw["threshold_note"])
    return out


def summary(raw: dict | None) -> str | None:
    """One line for ``simcost calibrate``'s output."""
    if not raw:
        return None
    rate = raw.get("fault_bytes_per_s")
    t = raw.get("threshold_bytes")
    return (f"host allocator {raw['allocator']}"
            + (f", page faults {rate / 1e9:.1f} GB/s" if rate else "")
            + (f", blocks >= {t / MIB:g} MiB return to the OS" if t else
               (", freed blocks kept" if raw.get("sizes") else "")))

