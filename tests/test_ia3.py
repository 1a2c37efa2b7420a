"""IA3 edge cases: which bias is scaled, power round trips, the fractional-power refusal. The runtime-match rows
(output and feed-forward placement on Qwen2, Llama, GPT-2 Conv1D with a Linear head) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, PeftModel
from safetensors.torch import load_file, save_file

import weightsteer
from cases import ROWS
from conftest import ATOL, TOKENS, load_base, make_adapter, model_logits

AROUND_ONE = ("ia3_l",)
GPT2_CONV1D = IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])


@pytest.fixture
def qwen2_adapter(bases, tmp_path):
    return ROWS["ia3-qwen2-bias"].adapter(bases("qwen2"), tmp_path / "a")


def test_ia3_scales_output_bias_only(bases, tmp_path, qwen2_adapter):
    out = weightsteer.merge(qwen2_adapter, tmp_path / "m")
    merged, base = load_file(out / "model.safetensors"), load_file(bases("qwen2") / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert "model.layers.0.self_attn.k_proj.bias" in changed
    assert "model.layers.0.self_attn.q_proj.bias" not in changed
    assert "model.layers.0.mlp.down_proj.weight" in changed


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_power_round_trip(bases, tmp_path, arch):
    """Merged at c = −1, then PEFT's adapter at c = +1 on top of it, gives the original base back.

    (Not with lm_head targeted: PEFT saves the head's base weight in the adapter and loads it over the merged one.)
    """
    if arch == "qwen2":
        adapter = ROWS["ia3-qwen2-bias"].adapter(bases(arch), tmp_path / "a")
    else:
        adapter = make_adapter(bases(arch), tmp_path / "a", GPT2_CONV1D, around_one=AROUND_ONE)
    inverse = weightsteer.merge(adapter, tmp_path / "inverse", coeff=-1, scheme="power")
    model = PeftModel.from_pretrained(load_base(inverse), adapter).eval()
    with torch.no_grad():
        round_trip = model(TOKENS).logits
    assert (round_trip - model_logits(bases(arch))).abs().max() <= ATOL


def test_power_half_twice_is_full(bases, tmp_path, qwen2_adapter):
    half = weightsteer.merge(qwen2_adapter, tmp_path / "half", coeff=0.5, scheme="power")
    twice = weightsteer.merge(qwen2_adapter, tmp_path / "twice", coeff=0.5, scheme="power", base=half)
    full = weightsteer.merge(qwen2_adapter, tmp_path / "full", coeff=1)
    assert (model_logits(twice) - model_logits(full)).abs().max() <= ATOL


def test_fractional_power_of_negative_scale_is_refused(bases, tmp_path, qwen2_adapter):
    weights = qwen2_adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.ia3_l"
    tensors[key][3] = -0.5
    save_file(tensors, weights)
    with pytest.raises(weightsteer.SchemeError, match=r"layers\.1\.self_attn\.v_proj.*integer coeff"):
        weightsteer.merge(qwen2_adapter, tmp_path / "out", coeff=0.5, scheme="power")
    assert not (tmp_path / "out").exists()
    weightsteer.merge(qwen2_adapter, tmp_path / "inverse", coeff=-1, scheme="power")  # integer powers are fine
