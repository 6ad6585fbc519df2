"""simcost against torch, exactly (the foundation issue's definitions).

Runs the ``simcost validate exact`` suites: small odd-sized configs for real on the CPU, and the
zoo's real sizes on fake tensors. Skipped without the torch extra.
"""
import pytest

from simcost.validate import exact

pytestmark = pytest.mark.torch

TINY = list(exact.tiny_cases())
ZOO = list(exact.zoo_cases())


def _id(c):
    return f"{c[0]}-{c[2]}-{c[3]}-{c[4]}"


@pytest.mark.parametrize("case", TINY, ids=[_id(c) for c in TINY])
def test_tiny_exact(case):
    r = exact.run_case(*case)
    if r.skipped:
        pytest.skip(r.skipped)
    assert not r.mismatches(), r.mismatches()


@pytest.mark.parametrize("case", ZOO, ids=[_id(c) for c in ZOO])
def test_zoo_exact_fake_tensors(case):
    r = exact.run_case(*case)
    if r.skipped:
        pytest.skip(r.skipped)
    assert not r.mismatches(), r.mismatches()
