"""AdaLoRA edge cases: a wrong init_r refused, the runtime's live state restored. The runtime-match rows
(Llama, Qwen2 biases, GPT-2 Conv1D, ranks pruned by PEFT's own rank allocator) are in tests/cases.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel

import weightsteer
from conftest import TOKENS, load_base, make_adapter


def adalora_config(**kwargs) -> AdaLoraConfig:
    return AdaLoraConfig(**{"init_r": 6, "target_r": 3, "lora_alpha": 8, "total_step": 10, **kwargs})


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
    adapter = make_adapter(bases("llama"), tmp_path / "a", adalora_config(target_modules=["q_proj"]), scale=0.2)
    model = PeftModel.from_pretrained(load_base(bases("llama")), adapter).eval()
    with torch.no_grad():
        before = model(TOKENS).logits
        with weightsteer.scaled(model, -0.5, scheme="knob:lora_E"):
            assert not torch.equal(model(TOKENS).logits, before)
        assert torch.equal(model(TOKENS).logits, before)
