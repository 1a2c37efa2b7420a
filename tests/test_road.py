"""RoAd: road_1, road_2 and road_4 on Qwen2 (biases rotated too) and Llama; group checks for "power"."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, RoadConfig, get_peft_model
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import ATOL, TOKENS, assert_base_identical, assert_matches_runtime, load_base, make_adapter, model_logits

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
VARIANTS = ("road_1", "road_2", "road_4")
AROUND_ONE = ("road_alpha",)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def road_adapter(bases, folder, arch: str, variant: str, seed: int = 1):
    config = RoadConfig(variant=variant, group_size=8, target_modules=TARGETS)
    return make_adapter(bases(arch), folder, config, around_one=AROUND_ONE, seed=seed)


@pytest.mark.parametrize("scheme", [None, "power", "strength", "knob:road_alpha", "knob:road_theta", "delta"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_road_qwen2_all_schemes(bases, tmp_path, variant, scheme):
    adapter = road_adapter(bases, tmp_path / "a", "qwen2", variant)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS, scheme)


@pytest.mark.parametrize("scheme", [None, "power"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_road_llama(bases, tmp_path, variant, scheme):
    adapter = road_adapter(bases, tmp_path / "a", "llama", variant)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


@pytest.mark.parametrize("scheme", [None, "power"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path, variant, scheme):
    adapter = road_adapter(bases, tmp_path / "a", "qwen2", variant)
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0, scheme=scheme)
    assert_base_identical(bases("qwen2"), out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_power_round_trip(bases, tmp_path, variant):
    """Merged at c = −1, then PEFT's adapter at c = +1 on top of it, gives the original base back."""
    adapter = road_adapter(bases, tmp_path / "a", "qwen2", variant)
    inverse = weightsteer.merge(adapter, tmp_path / "inverse", coeff=-1, scheme="power")
    model = PeftModel.from_pretrained(load_base(inverse), adapter).eval()
    with torch.no_grad():
        round_trip = model(TOKENS).logits
    assert (round_trip - model_logits(bases("qwen2"))).abs().max() <= ATOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_power_half_twice_is_full(bases, tmp_path, variant):
    adapter = road_adapter(bases, tmp_path / "a", "qwen2", variant)
    half = weightsteer.merge(adapter, tmp_path / "half", coeff=0.5, scheme="power")
    twice = weightsteer.merge(adapter, tmp_path / "twice", coeff=0.5, scheme="power", base=half)
    full = weightsteer.merge(adapter, tmp_path / "full", coeff=1)
    assert (model_logits(twice) - model_logits(full)).abs().max() <= ATOL


def test_road_1_negative_alpha_has_fractional_powers(bases, tmp_path):
    """α < 0 is the rotation by θ + π with scale |α|: still a scaled rotation with real powers."""
    adapter = road_adapter(bases, tmp_path / "a", "qwen2", "road_1")
    _set_alpha(adapter, "base_model.model.model.layers.0.self_attn.q_proj.road_alpha", -0.8)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, (-0.5, 0.5), "power")
    half = weightsteer.merge(adapter, tmp_path / "half", coeff=0.5, scheme="power")
    twice = weightsteer.merge(adapter, tmp_path / "twice", coeff=0.5, scheme="power", base=half)
    full = weightsteer.merge(adapter, tmp_path / "full", coeff=1)
    assert (model_logits(twice) - model_logits(full)).abs().max() <= ATOL


@pytest.mark.parametrize("variant", ["road_2", "road_4"])
def test_fractional_power_without_real_root_is_refused(bases, tmp_path, variant):
    adapter = road_adapter(bases, tmp_path / "a", "qwen2", variant)
    # θ ≈ 0, so the block of pair (0, 4) is ≈ diag(α₀, α₄): a negative α₀ is a negative real eigenvalue.
    _set_alpha(adapter, "base_model.model.model.layers.1.mlp.up_proj.road_alpha", -0.8)
    with pytest.raises(weightsteer.SchemeError, match=r"layers\.1\.mlp\.up_proj.*real eigenvalue ≤ 0.*integer coeff"):
        weightsteer.merge(adapter, tmp_path / "out", coeff=0.5, scheme="power")
    assert not (tmp_path / "out").exists()
    model = PeftModel.from_pretrained(load_base(bases("qwen2")), adapter)
    with pytest.raises(weightsteer.SchemeError, match="real eigenvalue"):
        with weightsteer.scaled(model, 0.5, scheme="power"):
            pass
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, (-1, 2), "power")  # integer powers are fine


def test_peft_rejects_road_on_conv1d(bases):
    """RoAd only wraps nn.Linear, so there is no GPT-2 Conv1D case to merge."""
    with pytest.raises(ValueError, match="Conv1D.*is not supported"):
        get_peft_model(load_base(bases("gpt2")), RoadConfig(group_size=8, target_modules=["c_attn"]))


def _set_alpha(adapter, key: str, value: float) -> None:
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[key][0] = value
    save_file(tensors, weights)
