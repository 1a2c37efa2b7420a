"""BOFT edge cases: the power round trip, refusals, N > 1 butterfly factors. The runtime-match rows (butterfly
rotations and output scale on Llama and Qwen2; linear and power schemes) are in tests/cases.py.

PEFT on CPU only builds one butterfly factor (N = 1); N > 1 is checked here against a dense
reconstruction that follows PEFT's get_delta_weight with PEFT's own permutation code, and on a GPU
by benchmarks/boft_gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch
from peft import BOFTConfig, PeftModel
from peft.tuners.boft.layer import BOFTLayer
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import TOKENS, load_base, make_adapter, model_logits
from weightsteer.adapters.base import ShapeLookup
from weightsteer.adapters.boft import BOFT

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def boft_adapter(bases, tmp_path, **options):
    config = BOFTConfig(boft_block_size=4, target_modules=options.pop("target_modules", ATTN_MLP), **options)
    return make_adapter(bases("llama"), tmp_path / "a", config, around_one=("boft_s",))


def test_boft_power_round_trip(bases, tmp_path):
    """R·c with s^c inverts exactly for N = 1: merge at −1, run the adapter at +1 on it, get the base."""
    base = bases("llama")
    adapter = boft_adapter(bases, tmp_path)
    inverse = weightsteer.merge(adapter, tmp_path / "minus", coeff=-1, scheme="power")
    with torch.no_grad():
        round_trip = PeftModel.from_pretrained(load_base(inverse), adapter).eval()(TOKENS).logits
    assert (round_trip - model_logits(base)).abs().max() < 1e-4


def test_power_refuses_fractional_coeff_with_negative_scale(bases, tmp_path):
    adapter = boft_adapter(bases, tmp_path, target_modules=["q_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.q_proj.boft_s"][3] = -0.5
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(weightsteer.SchemeError, match=r"layers\.1\.self_attn\.q_proj: boft_s has entries ≤ 0"):
        weightsteer.merge(adapter, tmp_path / "out", coeff=0.5, scheme="power")
    assert not (tmp_path / "out").exists()
    weightsteer.merge(adapter, tmp_path / "integer", coeff=-1, scheme="power")


def dense_boft(rotation: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """diag(s)·W·Mᵀ with dense matrices, following PEFT's Linear.get_delta_weight (CUDA path) line by line."""
    factors, blocks, size, _ = rotation.shape
    features = blocks * size
    skew = 0.5 * (rotation - rotation.mT).reshape(-1, size, size)
    eye = torch.eye(size).expand_as(skew)
    orthogonal = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(factors, blocks, size, size)
    block_diagonal = torch.stack([torch.block_diag(*orthogonal[k]) for k in range(factors)])
    orders = [BOFTLayer.block_butterfly_perm(None, features, blocks // 2**k, size // 2, factors - 1) for k in range(factors)]
    permutations = torch.stack([BOFTLayer.perm2mat(None, order) for order in orders])
    batch = torch.bmm(permutations, torch.bmm(block_diagonal, permutations.mT))
    butterfly = batch[0]
    for k in range(1, factors):
        butterfly = batch[k] @ butterfly
    return (butterfly @ weight.T).T * scale


@pytest.mark.parametrize("factors,blocks,size", [(1, 8, 4), (2, 8, 4), (3, 8, 4), (4, 8, 2), (2, 4, 6)])
def test_butterfly_merge_matches_dense_reconstruction(factors, blocks, size):
    torch.manual_seed(factors * 100 + blocks + size)
    features, out = blocks * size, 24
    tensors = {
        "base_model.model.layer.boft_R": 0.3 * torch.randn(factors, blocks, size, size),
        "base_model.model.layer.boft_s": 1 + 0.1 * torch.randn(out, 1),
    }
    (state,) = BOFT().parse({"boft_n_butterfly_factor": factors}, tensors, ShapeLookup({}), {})
    weight = torch.randn(out, features)
    BOFT().check_shapes(state, (out, features), None)
    expected = dense_boft(tensors["base_model.model.layer.boft_R"], tensors["base_model.model.layer.boft_s"], weight)
    torch.testing.assert_close(BOFT().weight(state, weight), expected, atol=1e-5, rtol=0)


def test_damaged_butterfly_is_refused():
    tensors = {
        "base_model.model.layer.boft_R": torch.zeros(3, 6, 4, 4),
        "base_model.model.layer.boft_s": torch.ones(5, 1),
    }
    with pytest.raises(weightsteer.AdapterError, match="divisible by 2\\^2"):
        BOFT().parse({}, tensors, ShapeLookup({}), {})
