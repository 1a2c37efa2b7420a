"""HRA edge cases: the default scheme, power round trips, the refusals of powers a reflection lacks. The runtime-match
rows (Householder chains with and without apply_GS, even and odd r; delta and power schemes) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import HRAConfig, PeftModel

import weightsteer
from conftest import TOKENS, load_base, make_adapter, model_logits
from weightsteer.adapters.hra import HRA

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (r, apply_GS): fractional powers exist only for even r without Gram–Schmidt; with apply_GS, H² = I.
CHAINS = {"even": (4, False), "odd": (3, False), "gs": (4, True)}


def hra_adapter(bases, tmp_path, chain, targets=ATTN_MLP):
    r, gram_schmidt = CHAINS[chain]
    return make_adapter(bases("llama"), tmp_path / "a", HRAConfig(r=r, apply_GS=gram_schmidt, target_modules=targets))


def test_default_scheme_is_delta():
    assert HRA().scheme(None).name == "delta"
    with pytest.raises(weightsteer.SchemeError, match="Available: power, delta"):
        HRA().scheme("linear")


@pytest.mark.parametrize("chain", CHAINS)
def test_hra_power_round_trip(bases, tmp_path, chain):
    """H^c is a group: merge at −1, run the PEFT adapter at +1 on it, get the base back."""
    base = bases("llama")
    adapter = hra_adapter(bases, tmp_path, chain)
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


@pytest.mark.parametrize("chain", ["odd", "gs"])
def test_fractional_power_of_a_reflection_is_refused(bases, tmp_path, chain):
    adapter = hra_adapter(bases, tmp_path, chain, targets=["q_proj"])
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
