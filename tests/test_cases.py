"""Runs every row of tests/cases.py: merged == PEFT's runtime at every coeff, and c = 0 is the base."""

from __future__ import annotations

import pytest

import weightsteer
from cases import CASES
from conftest import assert_base_identical, model_logits, runtime_logits


def _params():
    for case in CASES:
        for scheme in case.schemes:
            yield pytest.param(case, scheme, id=f"{case.id}-{scheme or 'default'}", marks=case.marks)


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """One adapter per case, built on first use and shared by its schemes."""
    made = {}

    def get(case):
        if case.id not in made:
            folder = tmp_path_factory.mktemp(case.id) / "adapter"
            made[case.id] = case.adapter(bases(case.arch), folder)
        return made[case.id]

    return get


@pytest.mark.parametrize(("case", "scheme"), list(_params()))
def test_merged_matches_runtime(case, scheme, bases, adapters, tmp_path):
    base, adapter = bases(case.arch), adapters(case)
    outputs = {c: tmp_path / f"c{c:g}" for c in case.coeffs_for(scheme)}
    results = weightsteer.merge_many(adapter, outputs, scheme=scheme, **case.options)  # one read of the base for every coeff
    base_logits = model_logits(base)
    zero_is_base = {r.coeff: not any("does not give the base" in w for w in r.warnings) for r in results}
    for c, out in outputs.items():
        expected = runtime_logits(base, adapter, c, scheme, **case.options)
        error = (model_logits(out) - expected).abs().max().item()
        assert error <= case.atol, f"coeff {c}: merged vs runtime max |Δlogit| = {error:.3g}"
        if c != 0:
            assert (expected - base_logits).abs().max() > 10 * case.atol, f"coeff {c}: the adapter has no effect; the case is vacuous"
        elif zero_is_base[c]:
            assert_base_identical(base, out)
