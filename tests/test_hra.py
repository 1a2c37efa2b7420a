"""HRA family: Householder chains with and without apply_GS, even and odd r; delta (default) and power schemes."""

from __future__ import annotations

import pytest
import torch
from peft import HRAConfig, PeftModel

import weightsteer
from conftest import TOKENS, assert_base_identical, assert_matches_runtime, load_base, make_adapter, model_logits
from weightsteer.adapters.hra import HRA

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
INTEGER_COEFFS = (-1, 0, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (r, apply_GS) → the power scheme's coeffs: fractional powers exist only for even r without Gram–Schmidt.
# With apply_GS, H² = I: even coeffs would only give the base again and are refused.
CASES = {"even": (4, False, COEFFS), "odd": (3, False, INTEGER_COEFFS), "gs": (4, True, (-1, 0, 1))}


def hra_adapter(bases, tmp_path, case, arch="llama", targets=ATTN_MLP):
    r, gram_schmidt, _ = CASES[case]
    return make_adapter(bases(arch), tmp_path / "a", HRAConfig(r=r, apply_GS=gram_schmidt, target_modules=targets))


@pytest.mark.parametrize("case", CASES)
def test_hra_llama(bases, tmp_path, case):
    adapter = hra_adapter(bases, tmp_path, case)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS)  # default scheme: delta
    assert_matches_runtime(bases("llama"), adapter, tmp_path, CASES[case][2], "power")


@pytest.mark.parametrize("case", ["even", "odd"])
def test_hra_qwen2_biases(bases, tmp_path, case):
    adapter = hra_adapter(bases, tmp_path, case, "qwen2", ["q_proj", "v_proj", "down_proj"])
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, CASES[case][2], "power")


def test_default_scheme_is_delta():
    assert HRA().scheme(None).name == "delta"
    with pytest.raises(weightsteer.SchemeError, match="Available: power, delta"):
        HRA().scheme("linear")


@pytest.mark.parametrize("case", CASES)
def test_hra_power_round_trip(bases, tmp_path, case):
    """H^c is a group: merge at −1, run the PEFT adapter at +1 on it, get the base back."""
    base = bases("llama")
    adapter = hra_adapter(bases, tmp_path, case)
    inverse = weightsteer.merge(adapter, tmp_path / "minus", coeff=-1, scheme="power")
    with torch.no_grad():
        round_trip = PeftModel.from_pretrained(load_base(inverse), adapter).eval()(TOKENS).logits
    assert (round_trip - model_logits(base)).abs().max() < 1e-4


def test_hra_power_halves_compose(bases, tmp_path):
    adapter = hra_adapter(bases, tmp_path, "even")
    half = weightsteer.merge(adapter, tmp_path / "half", coeff=0.5, scheme="power")
    twice = weightsteer.merge(adapter, tmp_path / "twice", base=half, coeff=0.5, scheme="power")
    once = weightsteer.merge(adapter, tmp_path / "once", coeff=1, scheme="power")
    assert (model_logits(twice) - model_logits(once)).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["odd", "gs"])
def test_fractional_power_of_a_reflection_is_refused(bases, tmp_path, case):
    adapter = hra_adapter(bases, tmp_path, case, targets=["q_proj"])
    message = "apply_GS / odd r is a reflection; it has no real fractional power"
    with pytest.raises(weightsteer.SchemeError, match=message):
        weightsteer.merge(adapter, tmp_path / "out", coeff=0.5, scheme="power")
    assert not (tmp_path / "out").exists()


def test_half_turn_is_refused_for_fractional_power():
    """Even r, but two perpendicular reflections: H turns their plane by π, so H^½ has no real value."""
    u = torch.zeros(6, 2)
    u[0, 0] = u[1, 1] = 1.0
    state = HRA().parse({}, {"base_model.model.layer.hra_u": u}, None, {})[0]
    with pytest.raises(weightsteer.SchemeError, match="eigenvalue −1"):
        HRA().weight(HRA().scheme("power").apply(state, 0.5), torch.eye(6))
    torch.testing.assert_close(HRA().weight(HRA().scheme("power").apply(state, 2), torch.eye(6)), torch.eye(6))


def test_even_power_of_gram_schmidt_reflection_is_refused(bases, tmp_path):
    adapter = hra_adapter(bases, tmp_path, "gs", targets=["q_proj"])
    with pytest.raises(weightsteer.SchemeError, match="every even coeff gives the base model back"):
        weightsteer.merge(adapter, tmp_path / "out", coeff=2, scheme="power")
    assert not (tmp_path / "out").exists()


def test_knob_is_refused(bases, tmp_path):
    adapter = hra_adapter(bases, tmp_path, "even", targets=["q_proj"])
    with pytest.raises(weightsteer.SchemeError, match="normalises every column of hra_u"):
        weightsteer.merge(adapter, tmp_path / "out", coeff=0.5, scheme="knob:hra_u")
    assert not (tmp_path / "out").exists()


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", HRAConfig(r=4, target_modules=ATTN_MLP))
    for scheme in ("delta", "power"):
        out = weightsteer.merge(adapter, tmp_path / scheme, coeff=0, scheme=scheme)
        assert_base_identical(bases("llama:sharded"), out)
