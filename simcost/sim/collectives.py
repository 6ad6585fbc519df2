"""Collective communication costs: the latency-bandwidth (alpha-beta) model over a topology.

For a group of ``n`` ranks moving a buffer of ``B`` bytes (the *full*, unsharded size) over
links of bandwidth ``bw`` (bytes/s per GPU, one direction) and per-hop latency ``lat``:

- ring all-reduce        2(n-1)/n * B / bw + 2(n-1) * lat   (reduce-scatter + all-gather)
- all-gather             (n-1)/n * B / bw  +  (n-1) * lat
- reduce-scatter         (n-1)/n * B / bw  +  (n-1) * lat
- all-to-all             (n-1)/n * B / bw  +  (n-1) * lat
- point-to-point         B / bw + lat

(Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in
MPICH", IJHPCA 2005; NCCL's nccl-tests "bus bandwidth" convention, PERFORMANCE.md.)

Hierarchical (two-level) collectives: a group of ``n`` ranks spanning ``k`` nodes with ``g``
ranks in each (n = g·k) can run, instead of one flat ring at the inter-node link, an intra-node
reduce-scatter (NVLink), an inter-node all-reduce of 1/g of the data over the k nodes (each of
the g ranks on its own NIC), and an intra-node all-gather (NCCL's tree / NVLS-tree style;
all-gather and reduce-scatter likewise split into an inter-node step on 1/g of the buffer and
an intra-node step on all of it). :meth:`Topology.all_reduce` and friends price both and take
the cheaper, as NCCL's tuner picks the faster algorithm.

Topology: ranks are packed ``gpus_per_node`` to a node (the profile's NVLink domain,
``interconnect.domain_devices``: 8 unless stated; 72 for a GB200 NVL72 rack). A group whose
ranks all lie in one node uses the profile's ``interconnect`` (NVLink/NVSwitch, PCIe, Infinity Fabric, TPU ICI); a
group spanning nodes is limited by the inter-node network, one NIC per GPU (rail-optimised).

A profile without a usable device-to-device link: a ``cpu`` or ``edge`` device (a host CPU, a
Raspberry Pi, an Apple SoC, a Jetson module) whose ``interconnect`` is absent (null), of kind
``none``, or without a positive bandwidth has no link at all, and is priced as one device:
:meth:`Topology.from_profile` refuses more. A ``gpu`` or ``tpu`` profile without an
``interconnect`` section, or without its bandwidth, falls back to PCIe peer traffic through the
host (:data:`DEFAULT_INTRA_BW`: consumer cards that state no link); one that states kind
``none`` or a bandwidth that is not a positive number has no link either.

Unless the profile says otherwise the inter-node link is 400 Gb/s NDR InfiniBand per GPU
(ConnectX-7, 8 per DGX H100: NVIDIA DGX H100 user guide, "8x single-port ConnectX-7 VPI,
400 Gb/s InfiniBand or 400 GbE") = 50 GB/s, with 5 us end-to-end small-message latency
(an engineering figure: IB switch hop ~0.1-0.2 us, NCCL's network proxy several us).

TPU slices (a profile interconnect with ``torus_dims``) have no nodes: every chip of the slice
is on the ICI torus, each with 2 links per axis. Ranks are laid out along the axes in order
(axis size ceil(n^(1/dims)) for an n-chip slice) and a group's collective runs bidirectional
rings on every axis it spans at once, so its bandwidth is the per-axis bandwidth (2 links one
way) times the axes spanned (jax-ml/scaling-book, "How to Think About TPUs" and the sharded
matmul chapter: an AllGather over one axis takes V / (2 W_ici), over several axes the
bandwidth multiplies by their number). Partial axes without wrap-around (slices smaller than a
full torus) would halve it; that is not modelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from simcost.errors import SimcostError

# 400 Gb/s NDR InfiniBand per GPU (ConnectX-7), one direction: 400e9 / 8 bytes/s
DEFAULT_INTER_NODE_BW = 400e9 / 8
DEFAULT_INTER_NODE_LAT = 5e-6
DEFAULT_GPUS_PER_NODE = 8
# a device profile without an interconnect (consumer cards): PCIe 4.0 x16 peer traffic through
# the host, 32 GB/s per direction theoretical (PCI-SIG), 10 us latency
DEFAULT_INTRA_BW = 32e9
DEFAULT_INTRA_LAT = 10e-6


NO_LINK_KIND = "none"


@dataclass(frozen=True)
class Link:
    kind: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Topology:
    intra: Link
    inter: Link
    host: Link
    gpus_per_node: int
    nodes: int
    torus_dims: int = 0          # > 0: a TPU slice, one ICI torus of that many dimensions
    torus_axis: int = 1          # chips along each axis

    @classmethod
    def from_profile(cls, profile, devices: int, nodes: int | None = None) -> "Topology":
        ic = getattr(profile, "interconnect", None)
        intra, why = device_link(profile)
        if intra is None:
            if devices > 1:
                raise SimcostError(f"hardware '{profile.name}' has no device interconnect "
                                   f"({why}); it is priced as one device, not --devices {devices}")
            intra = Link(NO_LINK_KIND, 0.0, 0.0)     # never used: one device has no peers
        hl = getattr(profile, "host_link", None)
        if hl is not None and hl.bandwidth_bytes_per_s is not None:
            host = Link(hl.kind, hl.bandwidth_bytes_per_s.value,
                        hl.latency_s.value if hl.latency_s is not None else 1e-5)
        else:
            host = Link("pcie (default)", DEFAULT_INTRA_BW, 1e-5)
        inter = Link("infiniband-ndr (default)", DEFAULT_INTER_NODE_BW, DEFAULT_INTER_NODE_LAT)
        dims = int(ic.torus_dims.value) if ic is not None and ic.torus_dims is not None else 0
        if dims > 0:           # the whole slice is one ICI domain, whatever the host count
            if nodes not in (None, 1):
                raise SimcostError(f"--nodes does not apply to {profile.name}: a TPU slice is "
                                   f"one ICI torus, whatever its host count")
            axis = max(2, math.ceil(round(devices ** (1.0 / dims), 9)))
            return cls(intra, inter, host, devices, 1, dims, axis)
        domain = (int(ic.domain_devices.value) if ic is not None and ic.domain_devices is not None
                  else DEFAULT_GPUS_PER_NODE)
        if nodes is None or nodes < 1:
            nodes = max(1, -(-devices // domain))
        per_node = max(1, -(-devices // nodes))
        return cls(intra, inter, host, per_node, nodes)

    @property
    def torus_axis_bandwidth(self) -> float:
        """One torus axis's bandwidth per chip, one way (2 of its links)."""
        return self.intra.bandwidth / self.torus_dims

    def link(self, group: int, stride: int = 1) -> Link:
        """The bottleneck link of a group of ``group`` ranks spaced ``stride`` apart."""
        if group <= 1:
            return self.intra
        if self.torus_dims:
            a = self.torus_axis
            lo = int(math.floor(math.log(max(stride, 1)) / math.log(a) + 1e-9))
            hi = int(math.floor(math.log((group - 1) * stride) / math.log(a) + 1e-9))
            axes = max(1, min(self.torus_dims, hi - lo + 1))
            return Link(f"{self.intra.kind} torus ({axes} of {self.torus_dims} axes)",
                        self.torus_axis_bandwidth * axes, self.intra.latency)
        span = group * stride
        return self.intra if span <= self.gpus_per_node else self.inter

    def _levels(self, n: int, stride: int) -> tuple[int, int] | None:
        """(ranks per node g, nodes k) of a group spanning nodes that splits evenly; else None."""
        if n <= 1 or n * stride <= self.gpus_per_node:
            return None
        g = min(n, max(1, self.gpus_per_node // max(stride, 1)))
        if g <= 1 or n % g:
            return None
        return g, n // g

    def all_reduce(self, nbytes, n: int, stride: int = 1):
        """Group all-reduce: the flat ring, or the two-level one across nodes when cheaper."""
        flat = all_reduce(nbytes, n, self.link(n, stride))
        lv = self._levels(n, stride)
        if lv is None:
            return flat
        return min(flat, hierarchical_all_reduce(nbytes, lv[0], lv[1], self.intra, self.inter))

    def all_gather(self, nbytes, n: int, stride: int = 1):
        """Group all-gather (``nbytes``: the gathered buffer), flat or two-level."""
        flat = all_gather(nbytes, n, self.link(n, stride))
        lv = self._levels(n, stride)
        if lv is None:
            return flat
        return min(flat, hierarchical_all_gather(nbytes, lv[0], lv[1], self.intra, self.inter))

    reduce_scatter = all_gather

    def all_to_all(self, nbytes, n: int, stride: int = 1):
        """Group all-to-all (``nbytes``: what one rank holds before the exchange)."""
        return all_to_all(nbytes, n, self.link(n, stride))


def device_link(profile) -> tuple[Link | None, str]:
    """(the profile's device-to-device link, '') or (None, why it has none): see the module
    docstring for which profiles have none and which fall back to PCIe."""
    ic = getattr(profile, "interconnect", None)
    bw = ic.bandwidth_bytes_per_s if ic is not None else None
    host_only = getattr(profile, "kind", "gpu") in ("cpu", "edge")
    if ic is None or bw is None:
        if host_only:
            return None, ("no interconnect in its profile" if ic is None
                          else "no interconnect bandwidth in its profile")
        return Link("pcie (default)", DEFAULT_INTRA_BW, DEFAULT_INTRA_LAT), ""
    if ic.kind == NO_LINK_KIND:
        return None, f"interconnect kind '{NO_LINK_KIND}'"
    if not (math.isfinite(bw.value) and bw.value > 0):
        return None, f"interconnect bandwidth {bw.value:g} B/s"
    lat = ic.latency_s.value if ic.latency_s is not None else DEFAULT_INTRA_LAT
    return Link(ic.kind, bw.value, lat), ""


def _check_link(link: Link) -> None:
    if not (link.bandwidth > 0 and math.isfinite(link.bandwidth)):
        raise SimcostError(f"link '{link.kind}' has no usable bandwidth ({link.bandwidth:g} B/s): "
                           f"no collective can run over it")


def all_reduce(nbytes, n: int, link: Link):
    if n <= 1:
        return 0.0
    _check_link(link)
    return 2.0 * (n - 1) / n * nbytes / link.bandwidth + 2.0 * (n - 1) * link.latency


def all_gather(nbytes, n: int, link: Link):
    """``nbytes``: the gathered (full) buffer."""
    if n <= 1:
        return 0.0
    _check_link(link)
    return (n - 1) / n * nbytes / link.bandwidth + (n - 1) * link.latency


reduce_scatter = all_gather


def all_to_all(nbytes, n: int, link: Link):
    """Pairwise / ring all-to-all: each rank keeps 1/n of its ``nbytes`` and sends the other
    (n-1)/n, one peer per step: (n-1)/n * B / bw + (n-1) * lat."""
    if n <= 1:
        return 0.0
    _check_link(link)
    return (n - 1) / n * nbytes / link.bandwidth + (n - 1) * link.latency


def hierarchical_all_reduce(nbytes, g: int, k: int, intra: Link, inter: Link):
    """Two-level all-reduce over k nodes of g ranks: intra-node reduce-scatter, inter-node
    all-reduce of the 1/g shard, intra-node all-gather."""
    return (reduce_scatter(nbytes, g, intra) + all_reduce(nbytes / g, k, inter)
            + all_gather(nbytes, g, intra))


def hierarchical_all_gather(nbytes, g: int, k: int, intra: Link, inter: Link):
    """Two-level all-gather (or, reversed, reduce-scatter): inter-node on 1/g of the buffer,
    then intra-node on all of it."""
    return all_gather(nbytes / g, k, inter) + all_gather(nbytes, g, intra)


def p2p(nbytes, link: Link):
    _check_link(link)
    return nbytes / link.bandwidth + link.latency
