"""AdaLoRA family: Llama, Qwen2 (biases), GPT-2 Conv1D, ranks pruned by PEFT's own rank allocator."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

import weightsteer
from conftest import TOKENS, assert_base_identical, assert_matches_runtime, load_base, make_adapter, perturb

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adalora_config(**kwargs) -> AdaLoraConfig:
    return AdaLoraConfig(**{"init_r": 6, "target_r": 3, "lora_alpha": 8, "total_step": 10, **kwargs})


def make_pruned_adapter(base, folder, config: AdaLoraConfig):
    """Train a few steps with update_and_allocate so PEFT masks and saves a truncated rank_pattern."""
    model = get_peft_model(load_base(base), config)
    perturb(model, 0.2)
    for step in range(1, config.total_step - config.tfinal + 1):
        model(TOKENS, labels=TOKENS).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    model.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(saved, indent=2))
    return folder


@pytest.mark.parametrize("scheme", [None, "delta", "knob:lora_E"])
def test_adalora_llama_all_schemes(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "a", adalora_config(target_modules=ATTN_MLP), scale=0.2)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


def test_adalora_qwen2(bases, tmp_path):
    config = adalora_config(target_modules=["q_proj", "v_proj", "o_proj"])
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config, scale=0.2)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)


def test_adalora_conv1d_gpt2(bases, tmp_path):
    config = adalora_config(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", config, scale=0.2)
    assert_matches_runtime(bases("gpt2"), adapter, tmp_path, COEFFS)


@pytest.mark.parametrize("lora_alpha", [8, 0])
def test_pruned_ranks_keep_init_r_scale(bases, tmp_path, lora_alpha):
    targets = ["q_proj", "v_proj", "down_proj"]
    config = adalora_config(lora_alpha=lora_alpha, tinit=0, tfinal=1, total_step=4, target_modules=targets)
    adapter = make_pruned_adapter(bases("llama"), tmp_path / "a", config)
    rank_pattern = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    kept = {sum(mask) for mask in rank_pattern.values()}
    assert kept - {0, 6}, f"no layer was pruned to a partial rank: {rank_pattern}"
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, (-1, 2), "knob:scaling")


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", adalora_config(target_modules=ATTN_MLP))
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("qwen2"), out)


def test_wrong_init_r_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", adalora_config(target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    expected = r"q_proj stores 6 ranks but adapter_config.json says init_r = 8"
    with pytest.raises(weightsteer.AdapterError, match=expected):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_runtime_restores_live_state(bases, tmp_path):
    from peft import PeftModel

    adapter = make_adapter(bases("llama"), tmp_path / "a", adalora_config(target_modules=["q_proj"]), scale=0.2)
    model = PeftModel.from_pretrained(load_base(bases("llama")), adapter).eval()
    with torch.no_grad():
        before = model(TOKENS).logits
        with weightsteer.scaled(model, -0.5, scheme="knob:lora_E"):
            assert not torch.equal(model(TOKENS).logits, before)
        assert torch.equal(model(TOKENS).logits, before)
