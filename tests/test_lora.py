"""LoRA family: plain, rsLoRA + patterns, lora_bias, embeddings (tied and untied), DoRA, Conv1D."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("scheme", [None, "delta", "knob:scaling", "knob:lora_A"])
def test_lora_llama_all_schemes(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_MLP))
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


def test_rslora_patterns_and_lora_bias_qwen2(bases, tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        lora_bias=True,
        target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
    )
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)


def test_lora_bias_on_biasless_layer_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", LoraConfig(r=2, lora_bias=True, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["o_proj"]
    # Forge a lora_B.bias on o_proj (bias-less in Qwen2): PEFT itself refuses to build one.
    from safetensors.torch import load_file, save_file

    tensors = {k.replace("q_proj", "o_proj"): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(weightsteer.AdapterError, match="o_proj trains a bias"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_conv1d_gpt2(bases, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", config)
    assert_matches_runtime(bases("gpt2"), adapter, tmp_path, COEFFS)


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gemma"])
def test_embedding_lora(bases, tmp_path, arch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    adapter = make_adapter(bases(arch), tmp_path / "a", config)
    assert_matches_runtime(bases(arch), adapter, tmp_path, COEFFS)
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    config_text = (out / "config.json").read_text()
    if arch == "llama":
        assert config_text == (bases(arch) / "config.json").read_text()
    else:  # the head keeps the original embedding: the checkpoint is untied
        assert json.loads(config_text)["tie_word_embeddings"] is False


def test_dora(bases, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, (0.5, 1, 2), "knob:scaling")


def test_dora_conv1d(bases, tmp_path):
    config = LoraConfig(r=4, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True)
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", config)
    assert_matches_runtime(bases("gpt2"), adapter, tmp_path, COEFFS)


def test_modules_to_save_interpolates(bases, tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS)


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", LoraConfig(r=4, target_modules=ATTN_MLP))
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


def test_residual_init_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(weightsteer.AdapterError, match="path_initial_model_for_weight_conversion"):
        weightsteer.merge(adapter, tmp_path / "out")


def test_conv1d_and_linear_head_in_one_adapter(bases, tmp_path):
    # PEFT saves a single fan_in_fan_out flag, which is wrong for either the Conv1D layers or lm_head.
    config = LoraConfig(r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True)
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", config)
    assert_matches_runtime(bases("gpt2"), adapter, tmp_path, (-1, 1))
