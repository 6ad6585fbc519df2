"""One validation case's result: simcost's numbers beside torch's, and the tolerances
(shared by the hand-built suites, :mod:`simcost.validate.exact`, and the traced one,
:mod:`simcost.validate.traced`)."""
from __future__ import annotations

from dataclasses import dataclass, field

FLOP_RTOL = 1e-4
ACT_RTOL = 1e-2


@dataclass
class CaseResult:
    model: str
    method: str
    dtype: str
    attn: str
    batch: int
    seq: int
    simcost: dict = field(default_factory=dict)
    torch: dict = field(default_factory=dict)
    ok: bool = False
    skipped: str | None = None
    seconds: float = 0.0

    def mismatches(self) -> dict:
        bad = {}
        for k, v in self.torch.items():
            s = self.simcost[k]
            if k in ("params_trainable", "params_total"):
                if s != v:
                    bad[k] = (s, v)
            else:
                tol = ACT_RTOL if k == "activations_bytes" else FLOP_RTOL
                if abs(s - v) > tol * max(abs(v), 1):
                    bad[k] = (s, v)
        return bad
