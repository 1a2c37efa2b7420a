"""LoRA edge cases: refusals, and tied embeddings untied by an embedding LoRA. The runtime-match rows
(plain, rsLoRA + patterns, lora_bias, embeddings, DoRA, Conv1D) are in tests/cases.py."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig

import weightsteer
from cases import LORA_EMBEDDING, ROWS
from conftest import make_adapter


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


@pytest.mark.parametrize("arch", LORA_EMBEDDING)
def test_embedding_lora_unties_a_tied_head(bases, tmp_path, arch):
    adapter = ROWS[f"lora-embedding-{arch}"].adapter(bases(arch), tmp_path / "a")
    config_text = (weightsteer.merge(adapter, tmp_path / "m", coeff=1) / "config.json").read_text()
    if arch == "llama":
        assert config_text == (bases(arch) / "config.json").read_text()
    else:  # the head keeps the original embedding: the checkpoint is untied
        assert json.loads(config_text)["tie_word_embeddings"] is False


def test_residual_init_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(weightsteer.AdapterError, match="path_initial_model_for_weight_conversion"):
        weightsteer.merge(adapter, tmp_path / "out")
