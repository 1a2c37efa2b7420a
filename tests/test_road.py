"""RoAd edge cases: "power" round trips and halves, negative α, the refusals. The runtime-match rows
(road_1, road_2 and road_4 on Qwen2 with biases rotated too, and Llama) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, RoadConfig, get_peft_model

import weightsteer
from cases import ROAD_VARIANTS, ROWS
from conftest import ATOL, TOKENS, load_base, model_logits


def road_adapter(bases, folder, row: str):
    case = ROWS[row]
    return case.adapter(bases(case.arch), folder)


@pytest.mark.parametrize("variant", ROAD_VARIANTS)
def test_power_round_trip(bases, tmp_path, variant):
    """Merged at c = −1, then PEFT's adapter at c = +1 on top of it, gives the original base back."""
    adapter = road_adapter(bases, tmp_path / "a", f"{variant}-qwen2-bias")
    inverse = weightsteer.merge(adapter, tmp_path / "inverse", coeff=-1, scheme="power")
    model = PeftModel.from_pretrained(load_base(inverse), adapter).eval()
    with torch.no_grad():
        round_trip = model(TOKENS).logits
    assert (round_trip - model_logits(bases("qwen2"))).abs().max() <= ATOL


@pytest.mark.parametrize("row", [f"{v}-qwen2-bias" for v in ROAD_VARIANTS] + ["road_1-negative-alpha-qwen2"])
def test_power_half_twice_is_full(bases, tmp_path, row):
    """road_1 with α < 0 too: the rotation by θ + π with scale |α| has real powers."""
    adapter = road_adapter(bases, tmp_path / "a", row)
    half = weightsteer.merge(adapter, tmp_path / "half", coeff=0.5, scheme="power")
    twice = weightsteer.merge(adapter, tmp_path / "twice", coeff=0.5, scheme="power", base=half)
    full = weightsteer.merge(adapter, tmp_path / "full", coeff=1)
    assert (model_logits(twice) - model_logits(full)).abs().max() <= ATOL


@pytest.mark.parametrize("variant", ["road_2", "road_4"])
def test_fractional_power_without_real_root_is_refused(bases, tmp_path, variant):
    """A negative real eigenvalue (its integer powers: the table's row of the same name)."""
    adapter = road_adapter(bases, tmp_path / "a", f"{variant}-negative-eigenvalue-qwen2")
    with pytest.raises(weightsteer.SchemeError, match=r"layers\.1\.mlp\.up_proj.*real eigenvalue ≤ 0.*integer coeff"):
        weightsteer.merge(adapter, tmp_path / "out", coeff=0.5, scheme="power")
    assert not (tmp_path / "out").exists()
    model = PeftModel.from_pretrained(load_base(bases("qwen2")), adapter)
    with pytest.raises(weightsteer.SchemeError, match="real eigenvalue"):
        with weightsteer.scaled(model, 0.5, scheme="power"):
            pass


def test_peft_rejects_road_on_conv1d(bases):
    """RoAd only wraps nn.Linear, so there is no GPT-2 Conv1D case to merge."""
    with pytest.raises(ValueError, match="Conv1D.*is not supported"):
        get_peft_model(load_base(bases("gpt2")), RoadConfig(group_size=8, target_modules=["c_attn"]))
