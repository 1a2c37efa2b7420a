"""Edge cases of the PEFT 0.21 types and LoRA variants (issue 13); their runtime matches are rows of cases.py.

Refusals say why, name the setting that causes them and write nothing; KaSA, whose live model has lost its base
weights, is checked against PEFT's own merge and a hand-written interpolation; runtime twins restore exactly.
"""

from __future__ import annotations

import json
import sys

import peft
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel

import weightsteer
from cases import ATTN, ATTN_MLP, TYPE_CASES
from conftest import TOKENS, assert_base_identical, build_base, load_base, make_adapter, model_logits
from safetensors.torch import load_file, save_file
from weightsteer.cli import main
from weightsteer.errors import AdapterError, SchemeError
from weightsteer.export import export_lora


def _refused(adapter, tmp_path, *phrases):
    result = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1, result.output
    error = json.loads(result.output)["error"]
    for phrase in phrases:
        assert phrase in error, error
    assert "Is --base the model" not in error
    assert not (tmp_path / "out").exists()
    return error


REFUSED_CONFIGS = {
    "alora": (
        "llama",
        lambda: LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 9]),
        ("alora_invocation_tokens", "depends on the input"),
    ),
    "layer-replication": (
        "llama",
        lambda: LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]),
        ("layer_replication", "more layers"),
    ),
    "pvera-sampling": (
        "llama",
        lambda: peft.PveraConfig(r=4, target_modules=ATTN, sample_at_inference=True),
        ("sample_at_inference=True",),
    ),
    "unilora-no-indices": ("llama", lambda: peft.UniLoraConfig(r=4, target_modules=ATTN), ("save_indices=True",)),
    "tinylora-no-projection": (
        "llama",
        lambda: peft.TinyLoraConfig(r=4, u=8, target_modules=ATTN, save_projection=False),
        ("save_projection=True",),
    ),
    "frod-no-projection": (
        "llama",
        lambda: peft.FrodConfig(target_modules=ATTN, save_projection=False),
        ("save_projection=True",),
    ),
    "glora-bias-path": ("qwen2", lambda: peft.GloraConfig(r=4, target_modules=["q_proj"]), ("config_C", "base weight")),
    "beft-without-bias": ("llama", lambda: peft.BeftConfig(target_modules=["q_proj"]), ("has no bias",)),
}


@pytest.mark.parametrize("case", REFUSED_CONFIGS)
def test_unmergeable_settings_are_refused_with_the_reason(bases, tmp_path, case):
    arch, config, phrases = REFUSED_CONFIGS[case]
    adapter = make_adapter(bases(arch), tmp_path / "a", config())
    _refused(adapter, tmp_path, *phrases)


@pytest.mark.parametrize("case", ["alora", "pvera-sampling"])
def test_inspect_and_the_runtime_twin_report_the_refusal(bases, tmp_path, case):
    arch, config, phrases = REFUSED_CONFIGS[case]
    adapter = make_adapter(bases(arch), tmp_path / "a", config())
    result = CliRunner().invoke(main, ["inspect", str(adapter), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["merge"] == "refused" and phrases[0] in report["reason"]
    model = PeftModel.from_pretrained(load_base(bases(arch)), adapter)
    with pytest.raises(SchemeError, match=phrases[0]), weightsteer.scaled(model, 0.5):
        pass


@pytest.mark.parametrize(
    ("peft_type", "phrases"),
    [
        ("LILY", ("Lily", "depends on the input")),
        ("SHADOW", ("shadow network",)),
        ("CARTRIDGE", ("KV cache",)),
        ("SOME_FUTURE_TYPE", ("'SOME_FUTURE_TYPE' is not supported",)),
    ],
)
def test_types_weightsteer_does_not_merge_name_the_type_not_the_base(tmp_path, peft_type, phrases):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": peft_type, "base_model_name_or_path": str(tmp_path / "no-such-base")})
    )
    error = _refused(folder, tmp_path, *phrases)
    assert "no-such-base" not in error


def test_kasa_merges_the_truncated_base_and_interpolates_from_the_real_one(bases, tmp_path):
    """KaSA's live model holds W_t (its base truncated at load), so the oracle is PEFT's own merge at c = 1 and
    W + c·(W₁ − W) built by hand from it at other c; the runtime twin refuses what it cannot reproduce."""
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=4, target_modules=ATTN, kasa_config={}))
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad():
        peft_logits = model(TOKENS).logits
    merged_by_peft = model.merge_and_unload().state_dict()
    plain = load_base(base)
    original = {k: v.clone() for k, v in plain.state_dict().items()}
    outputs = {c: tmp_path / f"c{c:g}" for c in (0, 0.5, 1)}
    weightsteer.merge_many(adapter, outputs)
    assert (model_logits(outputs[1]) - peft_logits).abs().max() <= 1e-4
    with torch.no_grad():
        for name, value in plain.state_dict().items():
            value.copy_(original[name] + 0.5 * (merged_by_peft[name] - original[name]))
        halfway = plain(TOKENS).logits
    assert (model_logits(outputs[0.5]) - halfway).abs().max() <= 1e-4
    assert_base_identical(base, outputs[0])
    live = PeftModel.from_pretrained(load_base(base), adapter)
    for scheme in (None, "delta"):
        with pytest.raises(SchemeError, match="KaSA replaced"), weightsteer.scaled(live, 0.5, scheme=scheme):
            pass


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("llama", lambda: peft.DeftConfig(r=4, para=True, target_modules=ATTN)),
        ("llama", lambda: peft.FrodConfig(target_modules=ATTN)),
        ("llama", lambda: peft.TinyLoraConfig(r=4, u=8, weight_tying=1.0, target_modules=ATTN)),
        ("llama", lambda: LoraConfig(r=4, use_dora=True, target_modules=["embed_tokens"])),
        ("llama", lambda: peft.OSFConfig(effective_rank=48, target_modules=ATTN)),
        ("qwen2", lambda: peft.AdamssConfig(r=16, num_subspaces=3, target_modules=ATTN)),
    ],
    ids=["para", "frod", "tinylora-shared-v", "dora-embedding", "osf", "adamss"],
)
def test_runtime_twin_restores_the_trained_adapter_exactly(bases, tmp_path, arch, config):
    adapter = make_adapter(bases(arch), tmp_path / "a", config(), scale=0.05)
    model = PeftModel.from_pretrained(load_base(bases(arch)), adapter).eval()
    with torch.no_grad():
        before = model(TOKENS).logits
        with weightsteer.scaled(model, -0.5):
            during = model(TOKENS).logits
        after = model(TOKENS).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("HIRA", lambda: peft.HiraConfig(r=4, target_modules=ATTN_MLP)),
        ("FROD", lambda: peft.FrodConfig(target_modules=ATTN)),
        ("TINYLORA", lambda: peft.TinyLoraConfig(r=4, u=8, target_modules=ATTN)),
        ("GRALORA", lambda: peft.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, target_modules=ATTN)),
        ("ADAMSS", lambda: peft.AdamssConfig(r=16, num_subspaces=3, target_modules=ATTN)),
    ],
)
def test_inspect_describes_the_new_types(bases, tmp_path, name, config):
    adapter = make_adapter(bases("llama"), tmp_path / "a", config(), scale=0.05)
    result = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(bases("llama")), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["adapter_type"] == name and report["merge"] == "exact"
    assert report["targets"] and all(c["relative_change"] > 0 for c in report["changes"])


ADAMSS = lambda: peft.AdamssConfig(r=16, num_subspaces=3, subspace_rank=2, target_modules=ATTN)  # noqa: E731


def test_adamss_without_scikit_learn_says_how_to_install_it(bases, tmp_path, monkeypatch):
    adapter = make_adapter(bases("llama"), tmp_path / "a", ADAMSS())
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    _refused(adapter, tmp_path, "needs scikit-learn", "pip install scikit-learn", "weightsteer[adamss]")


def test_adamss_refuses_a_base_that_clusters_differently(tmp_path, bases):
    """PEFT re-clusters the base at load; on another base the saved subspaces no longer fit their rows."""
    adapter = make_adapter(bases("llama"), tmp_path / "a", ADAMSS())
    other = build_base("llama", tmp_path / "other", seed=7)
    with pytest.raises(AdapterError, match="clustering the base weight gives subspaces"):
        weightsteer.merge(adapter, tmp_path / "out", coeff=1, base=other)
    assert not (tmp_path / "out").exists()


def test_adamss_exports_as_an_exact_lora(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "a", ADAMSS())
    result = export_lora(adapter, tmp_path / "lora", coeff=-0.5)
    assert {m.method for m in result.modules} == {"exact"} and result.max_relative_error < 1e-5
    weightsteer.merge(adapter, tmp_path / "merged", coeff=-0.5)
    exported = PeftModel.from_pretrained(load_base(base), tmp_path / "lora").eval()
    with torch.no_grad():
        gap = (exported(TOKENS).logits - model_logits(tmp_path / "merged")).abs().max()
    assert gap <= 1e-4


@pytest.mark.parametrize("case", TYPE_CASES, ids=lambda case: case.id)
def test_verify_passes_every_type_and_catches_a_tampered_tensor(bases, tmp_path, case):
    """verify rebuilds each adapted module with PEFT alone; every type must pass at c = 0.5, and a change of
    one element of a checked tensor must fail (the check is not vacuous for any type)."""
    adapter = make_adapter(bases(case.arch), tmp_path / "a", case.config(), scale=case.scale, around_one=case.around_one)
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=0.5, scheme=case.schemes[0])
    report = weightsteer.verify(out)
    assert report.ok, report.failures
    assert report.checks, "verify checked no tensor"
    _tamper(out, report.checks[0].tensor)
    tampered = weightsteer.verify(out)
    assert not tampered.ok and report.checks[0].tensor in " ".join(tampered.failures)


@pytest.mark.parametrize(
    "config",
    [
        lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], save_projection=False),
        lambda: peft.RandLoraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"], save_projection=False),
        lambda: peft.RandLoraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"]),
    ],
    ids=["vera-unsaved", "randlora-unsaved", "randlora-saved-with-layer-copies"],
)
def test_verify_uses_the_models_shared_projections(bases, tmp_path, config):
    """PEFT sizes shared projections by the model's largest adapted layer; the lone layer verify rebuilds must use
    the model's (saved, or drawn again at the model's size), not ones sized by itself."""
    adapter = make_adapter(bases("llama"), tmp_path / "a", config())
    report = weightsteer.verify(weightsteer.merge(adapter, tmp_path / "out", coeff=0.5))
    assert report.ok and report.checks, report.failures


def _tamper(folder, name):
    """Add 1% of the tensor's largest entry to one element, in the shard that holds it."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensor = tensors[name].clone()
            tensor.view(-1)[0] += 0.01 * tensor.abs().max()
            tensors[name] = tensor
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise KeyError(name)
