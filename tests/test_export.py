"""export-lora: an adapter at a coeff written as a plain PEFT LoRA reproduces the merged checkpoint at that coeff.

Exact factorisations (LoRA, rsLoRA, embeddings, DeLoRA, VeRA, AdaLoRA, LoHa) and full-rank SVD (DoRA with its
magnitude, IA3, RoAd, OFT) are checked by loading the export with PEFT as a LoRA and comparing logits with
weightsteer's merge at the same coeff; truncation errors are reported; inexpressible changes are refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import (
    AdaLoraConfig,
    DeloraConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    RoadConfig,
    VeraConfig,
)
from safetensors.torch import load_file

import weightsteer
from conftest import TOKENS, load_base, make_adapter, model_logits
from weightsteer.cli import main
from weightsteer.errors import ExportError
from weightsteer.export import export_lora

ATOL = 1e-4
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name → (arch, config factory, around_one, expected method)
CASES = {
    "lora": ("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_MLP), (), "exact"),
    "rslora_patterns": (
        "llama",
        lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, target_modules=ATTN_MLP),
        (),
        "exact",
    ),
    "lora_embedding": ("llama", lambda: LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), (), "exact"),
    "lora_tied_embedding": ("llama_tied", lambda: LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"]), (), "exact"),
    "lora_tied_follows": ("llama_tied", lambda: LoraConfig(r=4, target_modules=["embed_tokens"], ensure_weight_tying=True), (), "exact"),
    "lora_conv1d": ("gpt2", lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), (), "exact"),
    "lora_bias": ("qwen2", lambda: LoraConfig(r=2, lora_bias=True, target_modules=["q_proj", "v_proj"]), (), "exact"),
    "delora": ("llama", lambda: DeloraConfig(r=4, delora_lambda=2, target_modules=ATTN_MLP), (), "exact"),
    "vera": ("llama", lambda: VeraConfig(r=8, target_modules=ATTN_MLP, save_projection=False), (), "exact"),
    "adalora": ("llama", lambda: AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, total_step=10, target_modules=ATTN_MLP), (), "exact"),
    "loha": ("llama", lambda: LoHaConfig(r=3, alpha=6, target_modules=["q_proj", "down_proj"]), (), "exact"),
    "dora": ("llama", lambda: LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]), (), "svd"),
    "ia3": ("qwen2", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), ("ia3_l",), "svd"),
    "road": ("qwen2", lambda: RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj", "v_proj"]), ("road_alpha",), "svd"),
    "oft": ("llama", lambda: OFTConfig(oft_block_size=16, target_modules=["q_proj", "up_proj"]), (), "svd"),
}


def exported_logits(base, lora) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_base(base), lora).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def merged_logits(adapter, out, coeff, scheme=None) -> torch.Tensor:
    weightsteer.merge(adapter, out, coeff=coeff, scheme=scheme, overwrite=True)
    return model_logits(out)


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_merge(bases, tmp_path, name):
    arch, config, around_one, method = CASES[name]
    base = bases(arch)
    adapter = make_adapter(base, tmp_path / "adapter", config(), around_one=around_one)
    base_logits = model_logits(base)
    for coeff in (-1.0, 0.5):
        # energy 1: the SVD keeps every singular value, so the export is exact up to fp32 rounding
        result = export_lora(adapter, tmp_path / f"lora{coeff:g}", coeff=coeff, energy=1.0 if method == "svd" else None)
        assert {m.method for m in result.modules} == {method}
        assert result.max_relative_error < 1e-5
        expected = merged_logits(adapter, tmp_path / "merged", coeff)
        assert (expected - base_logits).abs().max() > 10 * ATOL, "adapter has no effect: test is vacuous"
        gap = (exported_logits(base, tmp_path / f"lora{coeff:g}") - expected).abs().max().item()
        assert gap <= ATOL, f"{name} at coeff {coeff}: exported LoRA vs merged max |Δlogit| = {gap:.3g}"


def test_written_lora_is_plain(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 2}, target_modules=["q_proj", "v_proj"]))
    export_lora(adapter, tmp_path / "lora", coeff=-1)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert not config["use_rslora"] and not config["use_dora"] and config["rank_pattern"] == {}
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert {k.rsplit(".", 2)[-2] for k in tensors} == {"lora_A", "lora_B"}
    assert all(t.shape[0] == 4 for k, t in tensors.items() if ".lora_A." in k)  # rank 2 padded to 4
    assert all(t.dtype == torch.float32 for t in tensors.values())
    text = (tmp_path / "lora" / "weightsteer-lora.json").read_text()
    report = json.loads(text)
    assert report["coeff"] == -1 and report["linear_in_coeff"] and len(report["modules"]) == 4
    assert report["adapter"] == "a" and report["terms"][0]["adapter"] == "a"  # published names, as in merge's provenance
    assert str(tmp_path) not in text and str(base) not in text  # no local paths: the sidecar push never uploads has them
    local = json.loads((tmp_path / "lora" / ".weightsteer-local.json").read_text())
    assert local == {"adapters": [str(tmp_path / "a")], "base_model": str(base)} and report["base_model"] == base.name


def test_linear_export_scales_like_coeff(bases, tmp_path):
    """A LoRA exported at 1, applied at scale s (PEFT's set_scale, llama.cpp's --lora-scaled), is the merge at s."""
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "a", DeloraConfig(r=4, delora_lambda=2, target_modules=ATTN_MLP))
    assert export_lora(adapter, tmp_path / "lora").linear_in_coeff
    model = PeftModel.from_pretrained(load_base(base), tmp_path / "lora").eval()
    for scale in (-1.0, 2.0):
        for module in model.modules():
            if hasattr(module, "set_scale"):
                module.set_scale("default", scale)
        with torch.no_grad():
            gap = (model(TOKENS).logits - merged_logits(adapter, tmp_path / "m", scale)).abs().max().item()
        assert gap <= ATOL


def test_dora_is_not_linear_in_coeff(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    result = export_lora(adapter, tmp_path / "lora", coeff=1)
    assert not result.linear_in_coeff and any("not linear in coeff" in w for w in result.warnings)


def test_rank_truncation_reports_error(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    errors = []
    for rank in (2, 4, 8):
        result = export_lora(adapter, tmp_path / f"r{rank}", rank=rank)
        assert result.rank == rank and {m.rank for m in result.modules} == {rank}
        errors.append(result.max_relative_error)
    assert errors[0] > errors[1] > 0 and errors[2] == 0
    dora = make_adapter(base, tmp_path / "d", LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    default = export_lora(dora, tmp_path / "dora-default")  # numerical rank ≤ 64: kept whole
    assert default.rank == 64 and default.max_relative_error < 1e-6
    energy = export_lora(dora, tmp_path / "dora-energy", energy=0.99)
    assert energy.rank < 64 and 0 < energy.max_relative_error <= 0.1 + 1e-6  # 99% of ‖ΔW‖² kept
    small = export_lora(dora, tmp_path / "dora-r1", rank=1)
    assert small.rank == 1 and small.max_relative_error > energy.max_relative_error


def test_trainable_token_rows_export_exactly_by_default(bases, tmp_path):
    """LoRA with trainable_token_indices: q_proj factors exactly, the new embedding rows by an SVD of numerical rank."""
    base = bases("llama")
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 42, 77])
    adapter = make_adapter(base, tmp_path / "a", config)
    result = export_lora(adapter, tmp_path / "lora", coeff=-0.5)
    rows = [m for m in result.modules if m.method == "svd"]
    assert len(rows) == 1 and rows[0].rank == 3 and rows[0].layer == "embedding"
    gap = (exported_logits(base, tmp_path / "lora") - merged_logits(adapter, tmp_path / "m", -0.5)).abs().max().item()
    assert gap <= ATOL


def test_refusals(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ExportError, match="not both"):
        export_lora(adapter, tmp_path / "x", rank=2, energy=0.9)
    with pytest.raises(ExportError, match="energy"):
        export_lora(adapter, tmp_path / "x", energy=1.5)
    norms = make_adapter(base, tmp_path / "ln", LNTuningConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ExportError, match="2-D weights"):
        export_lora(norms, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_cli_export_lora(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    runner = CliRunner()
    done = runner.invoke(main, ["export-lora", str(adapter), "-o", str(tmp_path / "lora"), "--coeff", "-1", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["coeff"] == -1 and report["rank"] == 4 and report["max_relative_error"] == 0
    text = runner.invoke(main, ["export-lora", str(adapter), "-o", str(tmp_path / "lora"), "--overwrite", "--rank", "2"])
    assert text.exit_code == 0 and "rank 2" in text.output and "--lora-scaled" in text.output
    bad = runner.invoke(main, ["export-lora", str(adapter), "-o", str(tmp_path / "lora2"), "--rank", "2", "--energy", "0.5"])
    assert bad.exit_code == 1 and "not both" in bad.output

