"""MiSS family (and old Bone checkpoints): default, r not dividing in (zero padding), "mini", "bat"
(ΔW depends on W), Llama and Qwen2 (biases), refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import MissConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import ATOL, assert_base_identical, assert_matches_runtime, make_adapter, model_logits, runtime_logits

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
VARIANTS = {
    "default": {"r": 8},
    "padded": {"r": 24},  # 64 % 24 and 128 % 24 ≠ 0: inputs are zero-padded to a multiple of r
    "mini": {"r": 8, "init_weights": "mini", "mini_r": 16},
    "bat": {"r": 8, "init_weights": "bat"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scheme", [None, "delta", "knob:miss_block"])
def test_miss_llama(bases, tmp_path, variant, scheme):
    config = MissConfig(target_modules=ATTN_MLP, **VARIANTS[variant])
    adapter = make_adapter(bases("llama"), tmp_path / "a", config, scale=0.05)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


@pytest.mark.parametrize("variant", ["padded", "bat"])
def test_miss_qwen2(bases, tmp_path, variant):
    config = MissConfig(target_modules=ATTN_MLP, **VARIANTS[variant])
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config, scale=0.05)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)


@pytest.mark.parametrize("variant", ["default", "padded", "bat"])
def test_bone_checkpoint_merges_as_miss(bases, tmp_path, variant):
    """PEFT 0.21.2 has no Bone: a MiSS checkpoint renamed to Bone's keys and type must merge to what
    PEFT's MiSS computes."""
    config = MissConfig(target_modules=ATTN_MLP, **VARIANTS[variant])
    miss = make_adapter(bases("llama"), tmp_path / "miss", config, scale=0.05)
    bone = _as_bone(miss, tmp_path / "bone")
    base_logits = model_logits(bases("llama"))
    for c in COEFFS:
        merged = model_logits(weightsteer.merge(bone, tmp_path / "out", coeff=c, overwrite=True))
        expected = runtime_logits(bases("llama"), miss, c)
        assert (merged - expected).abs().max() <= ATOL, f"coeff {c}"
        assert c == 0 or (expected - base_logits).abs().max() > 10 * ATOL


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    config = MissConfig(target_modules=ATTN_MLP, **VARIANTS["bat"])
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", config, scale=0.05)
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


def test_config_not_matching_block_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", MissConfig(r=8, target_modules=["q_proj"]))
    config = json.loads((adapter / CONFIG).read_text())
    config["init_weights"] = "bat"
    (adapter / CONFIG).write_text(json.dumps(config))
    with pytest.raises(weightsteer.AdapterError, match=r"init_weights='bat' needs a 3-D block"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_block_width_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", MissConfig(r=8, target_modules=["k_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.k_proj.miss_block"))
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.k_proj: output features"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _as_bone(miss, folder):
    shutil.copytree(miss, folder)
    tensors = load_file(folder / WEIGHTS)
    save_file({k.replace("miss_block", "bone_block"): v for k, v in tensors.items()}, folder / WEIGHTS)
    config = json.loads((folder / CONFIG).read_text())
    config["peft_type"] = "BONE"
    (folder / CONFIG).write_text(json.dumps(config))
    return folder
