"""`weightsteer verify`: merged checkpoints pass against PEFT's own forward, tampered ones fail and say where."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import make_adapter
from weightsteer.card import base_license, card_metadata
from weightsteer.cli import main
from weightsteer.verify import DEFAULT_PROMPTS

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama_dropout": ("llama", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=ATTN_MLP)),
    "llama_bf16": ("llama:bf16", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_MLP)),
    "llama_sharded_embedding": ("llama:sharded", LoraConfig(r=4, target_modules=["embed_tokens", "down_proj"])),
    "gemma_tied_embedding": ("gemma", LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
    "qwen2_lora_bias": ("qwen2", LoraConfig(r=4, lora_bias=True, target_modules=["q_proj", "v_proj"])),
    "gpt2_conv1d_dora": ("gpt2", LoraConfig(r=4, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "modules_to_save": ("llama", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
}


def tamper(folder, name, change) -> None:
    """Rewrite the shard holding tensor `name` with change(tensor) in its place."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = change(tensors[name])
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise KeyError(name)


@pytest.fixture
def merged(bases, tmp_path):
    """A Llama LoRA merged at coeff 0.5."""
    adapter = make_adapter(bases("llama"), tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_MLP))
    return weightsteer.merge(adapter, tmp_path / "merged", coeff=0.5)


@pytest.mark.parametrize("case", CASES)
def test_merged_checkpoints_pass(bases, tmp_path, case):
    arch, config = CASES[case]
    adapter = make_adapter(bases(arch), tmp_path / "adapter", config)
    for coeff in (-1, 0.5, 2):
        out = weightsteer.merge(adapter, tmp_path / f"c{coeff:g}", coeff=coeff)
        report = weightsteer.verify(out)
        assert report.ok, report.failures
        provenance = json.loads((out / "weightsteer.json").read_text())
        assert {c.tensor for c in report.checks} >= set(provenance["result"]["changed_tensors"]) - {
            n for n in provenance["result"]["changed_tensors"] if n.endswith(".bias")
        }
        assert report.untouched > 0 and not report.changed_untouched and not report.missing and not report.unexpected


@pytest.mark.parametrize("scheme", ["delta", "knob:lora_A"])
def test_other_schemes_pass(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "adapter", LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=-0.5, scheme=scheme)
    report = weightsteer.verify(out)
    assert report.ok and report.scheme == scheme, report.failures


def test_tampered_module_fails_and_names_it(merged):
    name = "model.layers.1.mlp.down_proj.weight"
    generator = torch.Generator().manual_seed(3)
    tamper(merged, name, lambda w: w + 0.01 * w.std() * torch.randn(w.shape, generator=generator))
    result = CliRunner().invoke(main, ["verify", str(merged)])
    assert result.exit_code == 1
    assert "FAILED" in result.stdout
    assert name in result.stderr and "what rounding the merged tensor to its dtype explains" in result.stderr
    others = [c for c in weightsteer.verify(merged).checks if c.tensor != name]
    assert all(c.ok for c in others)


def test_tampered_bf16_element_fails(bases, tmp_path):
    adapter = make_adapter(bases("llama:bf16"), tmp_path / "adapter", LoraConfig(r=4, target_modules=["v_proj"]))
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=1)
    name = "model.layers.0.self_attn.v_proj.weight"

    def nudge(w):
        w = w.clone()
        w[5, 9] += 8 * w.float().abs().max().to(w.dtype) * 2**-8  # a few bf16 steps on one element
        return w

    tamper(out, name, nudge)
    report = weightsteer.verify(out)
    assert [c.tensor for c in report.checks if not c.ok] == [name]


def test_untouched_missing_and_wrong_coeff_fail(merged, tmp_path):
    assert not weightsteer.verify(merged, coeff=0.55).ok  # merged at 0.5
    tamper(merged, "model.norm.weight", lambda w: w + 1e-3)
    report = weightsteer.verify(merged)
    assert report.changed_untouched.keys() == {"model.norm.weight"}
    assert any("model.norm.weight" in f and "does not touch" in f for f in report.failures)
    shard = merged / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    assert "model.layers.0.input_layernorm.weight: missing from the merged checkpoint" in weightsteer.verify(merged).failures
    tamper(merged, "model.layers.0.self_attn.q_proj.weight", lambda w: w[:32])
    assert "model.layers.0.self_attn.q_proj.weight: has shape [32, 64] in the merged checkpoint, unlike the base" in (
        weightsteer.verify(merged).failures
    )


def test_untied_head_is_compared(bases, tmp_path):
    adapter = make_adapter(bases("llama_tied"), tmp_path / "adapter", LoraConfig(r=4, target_modules=["embed_tokens"]))
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=1)
    assert weightsteer.verify(out).ok
    tamper(out, "lm_head.weight", lambda w: w * 1.001)
    assert "lm_head.weight" in weightsteer.verify(out).changed_untouched


def test_logits_with_token_id_prompts(merged):
    report = weightsteer.verify(merged, logits=True)  # no tokenizer: random token-id prompts
    assert report.ok, report.failures
    logits = report.logits
    assert logits.max_abs < 1e-4 and logits.top1_agreement == 1 and logits.greedy_agreement == 1
    assert logits.kl_mean < 1e-6
    report = weightsteer.verify(merged, prompts=["1 5 9, 17", [3, 4]])
    assert report.logits.positions == 6
    with pytest.raises(weightsteer.VerificationError, match="prompts must be token ids"):
        weightsteer.verify(merged, prompts=["Hello there"])


def test_logits_with_a_tokenizer(merged):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for prompt in DEFAULT_PROMPTS for w in prompt.split()})
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (merged / "tokenizer.json").unlink()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(merged)
    report = weightsteer.verify(merged, logits=True)
    assert report.ok, report.failures
    assert report.logits.positions == sum(len(p.split()) for p in DEFAULT_PROMPTS)


def test_cli_json_prompts_file_and_atol(merged, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 2 3\n\n7 8 9 10\n")
    result = CliRunner().invoke(main, ["verify", str(merged), "--prompts", str(prompts), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["logits"]["positions"] == 7 and data["coeff"] == 0.5
    result = CliRunner().invoke(main, ["verify", str(merged), "--logits", "--atol", "1e-12", "-q"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "logits: max |Δ|" in result.stderr and "× atol 1e-12" in result.stderr


def test_without_provenance_needs_adapter_and_coeff(merged, tmp_path):
    local_paths = json.loads((merged / ".weightsteer-local.json").read_text())
    (merged / "weightsteer.json").unlink()
    with pytest.raises(weightsteer.VerificationError, match="pass them"):
        weightsteer.verify(merged)
    assert weightsteer.verify(merged, local_paths["adapter"], 0.5).ok


def test_merge_verify_writes_cards_with_siblings(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "adapter", LoraConfig(r=4, target_modules=["q_proj"]))
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(out), "-c", "-1", "-c", "1", "--verify", "--json"])
    assert result.exit_code == 0, result.output
    assert all(entry["verification"]["ok"] for entry in json.loads(result.stdout))
    card = (tmp_path / "model-c1" / "README.md").read_text()
    assert "coeff **1**" in card and "**passed**" in card and "`model-c-1`" in card
    assert "license: apache-2.0" in card and "base_model:" not in card  # local base: no Hub id to name
    metadata = ModelCard.load(tmp_path / "model-c1" / "README.md").data  # the Hub's own reader
    assert metadata.license == "apache-2.0" and "weightsteer" in metadata.tags and metadata.library_name == "transformers"
    assert json.loads((tmp_path / "model-c-1" / "weightsteer.json").read_text())["verification"]["ok"]


def test_base_license_sources(tmp_path):
    assert base_license(tmp_path) is None
    (tmp_path / "LICENSE").write_text("                    Apache License\n              Version 2.0, January 2004\n")
    assert base_license(tmp_path) == "apache-2.0"
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# A model\n")
    assert base_license(tmp_path) == "mit"


@pytest.mark.parametrize(
    "text",
    [
        "---\nlicense: mit\n---\n# A model\n",
        "\ufeff---\r\nlicense: apache-2.0\r\ntags: [a, b]\r\n---\r\nbody",
        "  \n---\nlicense: mit\n---",
        "# no metadata\n---\nlicense: mit\n---\n",
        "---\n---\nbody",
    ],
)
def test_card_metadata_reads_what_huggingface_hub_reads(tmp_path, text):
    card = tmp_path / "README.md"
    card.write_text(text, encoding="utf-8", newline="")
    assert card_metadata(card) == (metadata_load(card) or {})


@pytest.mark.parametrize("text", ["---\n- a list\n---\n", "---\nlicense: [unclosed\n---\n", "---\n\tlicense: mit\n---\n"])
def test_card_metadata_that_is_not_a_mapping_counts_as_none(tmp_path, text):
    (tmp_path / "README.md").write_text(text)
    assert base_license(tmp_path) is None
