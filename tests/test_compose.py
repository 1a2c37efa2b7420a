"""Several adapters, each at its own coeff, in one pass; recipes that build many outputs from one read of the base.

Oracles: PEFT's forward with every adapter loaded and active (one family), chained single merges (different
families), the sum of single merges' changes (`compose: sum`), and the base's bytes (coeff 0)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import DeloraConfig, IA3Config, LoHaConfig, LoraConfig, OFTConfig, PeftMixedModel, PeftModel, VeraConfig
from safetensors.torch import load_file

import weightsteer
from conftest import ATOL, TOKENS, assert_base_identical, load_base, make_adapter, model_logits
from weightsteer import Steer
from weightsteer.checkpoint import Checkpoint
from weightsteer.cli import main
from test_push import hub  # noqa: F401 (a fixture: the local test Hub)

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_MLP),
    "rslora": lambda: LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj", "up_proj"]),
    "delora_a": lambda: DeloraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "delora_b": lambda: DeloraConfig(r=2, target_modules=["q_proj", "up_proj"]),
    "vera_a": lambda: VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "vera_b": lambda: VeraConfig(r=8, target_modules=["v_proj", "q_proj"]),
    "ia3": lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "oft": lambda: OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "up_proj"]),
    "pos": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "neg": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "loha": lambda: LoHaConfig(r=4, target_modules=["q_proj", "up_proj"]),
    "tied_embedding": lambda: LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
    "tied_mlp": lambda: LoraConfig(r=4, target_modules=["up_proj", "q_proj"]),
}
AROUND_ONE = {"ia3": ("ia3_l",)}
ARCH = {"tied_embedding": "gemma", "tied_mlp": "gemma"}  # tied embeddings: one adapter unties the head


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            folder = tmp_path_factory.mktemp("adapters") / name
            seed = 1 + list(CONFIGS).index(name)
            base = bases(ARCH.get(name, "llama"))
            made[name] = make_adapter(base, folder, CONFIGS[name](), around_one=AROUND_ONE.get(name, ()), seed=seed)
        return made[name]

    return get


def peft_logits(base, folders: dict, coeffs: dict) -> torch.Tensor:
    """PEFT's forward with every adapter loaded under its name, all active (in this order), each at its coeff."""
    names = list(folders)
    model = PeftModel.from_pretrained(load_base(base), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.base_model.set_adapter(names)
    model.eval()
    with torch.no_grad(), weightsteer.scaled(model, coeffs):
        return model(TOKENS).logits


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


COMPOSITIONS = {
    "lora-rslora-dora": {"dora": 0.7, "lora": -0.5, "rslora": 1.3},  # DoRA first: PEFT takes its norm on the base
    "delora-pair": {"delora_a": 0.8, "delora_b": -1.2},
    "vera-pair": {"vera_a": -0.6, "vera_b": 1.5},
    "positive-negative": {"pos": 1.0, "neg": -1.0},
    "tied-embeddings": {"tied_mlp": 0.8, "tied_embedding": -1.5},
}


@pytest.mark.parametrize("case", COMPOSITIONS)
def test_one_family_matches_peft_with_all_adapters_active(bases, adapters, tmp_path, case):
    coeffs = COMPOSITIONS[case]
    base = bases(ARCH.get(next(iter(coeffs)), "llama"))
    out = weightsteer.merge([Steer(adapters(n), c) for n, c in coeffs.items()], tmp_path / "out")
    expected = peft_logits(base, {n: adapters(n) for n in coeffs}, coeffs)
    assert (model_logits(out) - expected).abs().max() <= ATOL
    assert weightsteer.verify(out).ok
    singles = [peft_logits(base, {n: adapters(n)}, {n: c}) for n, c in coeffs.items()]
    assert all((expected - s).abs().max() > 10 * ATOL for s in singles), "every term must matter"


def test_dora_is_computed_against_the_base_whatever_the_order(bases, adapters, tmp_path):
    """Listed after a LoRA, DoRA still takes its norm on the base weight (PEFT would take it on the adapted one)."""
    coeffs = {"lora": -0.5, "dora": 0.7}
    out = weightsteer.merge([Steer(adapters(n), c) for n, c in coeffs.items()], tmp_path / "out")
    folders = {n: adapters(n) for n in ("dora", "lora")}
    dora_first = peft_logits(bases("llama"), folders, coeffs)
    assert (model_logits(out) - dora_first).abs().max() <= ATOL
    lora_first = peft_logits(bases("llama"), dict(reversed(folders.items())), coeffs)
    assert (lora_first - dora_first).abs().max() > 10 * ATOL  # peft#3608: PEFT's order matters here


@pytest.mark.parametrize("pair", [("lora", "ia3"), ("ia3", "lora"), ("oft", "lora"), ("lora", "oft")])
def test_different_families_equal_chained_single_merges(adapters, tmp_path, pair):
    first, second = pair
    coeffs = {first: 0.6, second: -0.8}
    out = weightsteer.merge([Steer(adapters(n), c) for n, c in coeffs.items()], tmp_path / "out")
    step = weightsteer.merge(adapters(first), tmp_path / "step", coeff=coeffs[first])
    chained = weightsteer.merge(adapters(second), tmp_path / "chained", coeff=coeffs[second], base=step)
    ours, theirs = tensors(out), tensors(chained)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert (model_logits(out) - model_logits(chained)).abs().max() <= ATOL
    report = weightsteer.verify(out)  # each family's PEFT layer applied to the weight the previous one computes
    assert report.ok, report.failures


def test_compose_sum_adds_every_change_against_the_base(bases, adapters, tmp_path):
    coeffs = {"oft": 0.9, "ia3": -0.7, "lora": 0.4}
    out = weightsteer.merge([Steer(adapters(n), c) for n, c in coeffs.items()], tmp_path / "out", compose="sum")
    base = tensors(bases("llama"))
    singles = [tensors(weightsteer.merge(adapters(n), tmp_path / n, coeff=c)) for n, c in coeffs.items()]
    ours = tensors(out)
    for name, weight in base.items():
        expected = weight + sum(single[name] - weight for single in singles)
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6, msg=name)
    chained = weightsteer.merge([Steer(adapters(n), c) for n, c in coeffs.items()], tmp_path / "chain")
    assert (model_logits(out) - model_logits(chained)).abs().max() > ATOL  # chaining differs at second order
    assert weightsteer.verify(out).ok
    (chained / "weightsteer.json").write_text((out / "weightsteer.json").read_text())
    assert not weightsteer.verify(chained).ok  # the chained checkpoint is not the sum


def test_coeff_zero_is_the_base_and_a_zero_term_changes_nothing(bases, adapters, tmp_path):
    zero = weightsteer.merge([Steer(adapters("dora"), 0), Steer(adapters("ia3"), 0)], tmp_path / "zero")
    assert_base_identical(bases("llama"), zero)
    with_zero = weightsteer.merge([Steer(adapters("lora"), 0.5), Steer(adapters("dora"), 0.0)], tmp_path / "with")
    alone = weightsteer.merge(adapters("lora"), tmp_path / "alone", coeff=0.5)
    ours, theirs = tensors(with_zero), tensors(alone)
    assert all(torch.equal(ours[n].view(torch.uint8), t.view(torch.uint8)) for n, t in theirs.items())


def test_provenance_card_and_verify_list_every_term(adapters, tmp_path, monkeypatch):
    out = weightsteer.merge([Steer(adapters("lora"), 0.5), Steer(adapters("ia3"), -0.3, "power")], tmp_path / "out")
    record = json.loads((out / "weightsteer.json").read_text())
    # Local adapters by folder name only (no local paths published); their absolute paths stay in the sidecar.
    assert [(t["adapter"], t["adapter_type"], t["coeff"], t["scheme"]["name"]) for t in record["terms"]] == [
        ("lora", "LORA", 0.5, "linear"),
        ("ia3", "IA3", -0.3, "power"),
    ]
    card = (out / "README.md").read_text()
    assert "`lora`" in card and "`ia3`" in card and "**-0.3**" in card
    assert str(adapters("lora").parent) not in card + json.dumps(record)
    local = json.loads((out / ".weightsteer-local.json").read_text())
    assert local["terms"] == [str(adapters("lora")), str(adapters("ia3"))]
    monkeypatch.chdir(tmp_path / "out")  # verify from another folder finds both adapters through the sidecar
    report = weightsteer.verify(".")
    assert report.ok, report.failures
    assert report.coeff is None and [t["coeff"] for t in report.terms] == [0.5, -0.3]
    assert {c.tensor for c in report.checks} >= {n for n in record["result"]["changed_tensors"] if n.endswith("proj.weight")}


def test_verify_catches_a_composition_that_misses_a_term(adapters, tmp_path):
    """A checkpoint merged from one adapter fails verification against the two-term record."""
    out = weightsteer.merge([Steer(adapters("lora"), 0.5), Steer(adapters("rslora"), 1.0)], tmp_path / "out")
    alone = weightsteer.merge(adapters("lora"), tmp_path / "alone", coeff=0.5)
    for record in ("weightsteer.json", ".weightsteer-local.json"):  # the record, and where its local adapters are
        (alone / record).write_text((out / record).read_text())
    report = weightsteer.verify(alone)
    assert not report.ok and any("v_proj" in f for f in report.failures)


def test_verify_logits_of_a_one_family_composition(adapters, tmp_path):
    out = weightsteer.merge([Steer(adapters("dora"), 0.7), Steer(adapters("lora"), -0.5)], tmp_path / "out")
    report = weightsteer.verify(out, logits=True, prompts=[[1, 5, 9, 17]])
    assert report.ok and report.logits is not None and report.logits.max_abs <= 1e-3, report.failures


def test_export_lora_of_a_composition_concatenates_exact_factors(bases, adapters, tmp_path):
    coeffs = {"lora": 0.5, "rslora": -1.0}
    steers = [Steer(adapters(n), c) for n, c in coeffs.items()]
    exported = weightsteer.export.export_lora(steers, tmp_path / "lora")
    assert exported.rank == 4 + 2 and all(m.method == "exact" for m in exported.modules)
    merged = weightsteer.merge(steers, tmp_path / "merged")
    model = PeftModel.from_pretrained(load_base(bases("llama")), tmp_path / "lora").eval()
    with torch.no_grad():
        assert (model(TOKENS).logits - model_logits(merged)).abs().max() <= ATOL


# ---- runtime ---------------------------------------------------------------------------------------


def test_scaled_with_a_mapping_restores_every_adapter(bases, adapters):
    folders = {"dora": adapters("dora"), "lora": adapters("lora")}
    model = PeftModel.from_pretrained(load_base(bases("llama")), folders["dora"], adapter_name="dora")
    model.load_adapter(folders["lora"], adapter_name="lora")
    model.base_model.set_adapter(["dora", "lora"])
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        original = model(TOKENS).logits
        with weightsteer.scaled(model, {"dora": -1.0, "lora": 2.0}):
            inside = model(TOKENS).logits
        after = model(TOKENS).logits
    assert (inside - original).abs().max() > 10 * ATOL
    assert torch.equal(after, original)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(weightsteer.AdapterError, match="no adapter named .formal."):
        with weightsteer.scaled(model, {"dora": 1.0, "formal": 1.0}):
            pass
    model.base_model.set_adapter("dora")
    with pytest.raises(weightsteer.SchemeError, match="set_adapter"):
        with weightsteer.scaled(model, {"dora": 1.0, "lora": 1.0}):
            pass


def test_scaled_on_a_mixed_model_matches_the_merged_families(bases, adapters, tmp_path):
    """A PeftMixedModel with a LoRA and a LoHa active: scaled with a mapping is the merge of both (order-free:
    both add constant changes), and everything is restored on exit."""
    coeffs = {"lora": 0.5, "loha": -1.0}
    model = PeftMixedModel.from_pretrained(load_base(bases("llama")), adapters("lora"), adapter_name="lora")
    model.load_adapter(adapters("loha"), adapter_name="loha")
    model.set_adapter(list(coeffs))
    model.eval()
    merged = weightsteer.merge([Steer(adapters(n), c) for n, c in coeffs.items()], tmp_path / "out")
    with torch.no_grad():
        original = model(TOKENS).logits
        with weightsteer.scaled(model, coeffs):
            assert (model(TOKENS).logits - model_logits(merged)).abs().max() <= ATOL
        assert torch.equal(model(TOKENS).logits, original)


# ---- recipes ---------------------------------------------------------------------------------------


def _recipe(adapters, tmp_path) -> dict:
    return {
        "outputs": [
            {"path": str(tmp_path / "a"), "adapters": [{"adapter": str(adapters("lora")), "coeff": 0.5}, {"adapter": str(adapters("ia3")), "coeff": -0.3}]},
            {"path": str(tmp_path / "b"), "adapters": [{"adapter": str(adapters("lora")), "coeff": -1}]},
            {"path": str(tmp_path / "c"), "adapters": [{"adapter": str(adapters("ia3")), "coeff": 1.0, "scheme": "power"}], "compose": "sum"},
        ]
    }


def test_recipe_builds_every_output_from_one_read_of_the_base(bases, adapters, tmp_path, monkeypatch):
    recipe = _recipe(adapters, tmp_path)
    reads: Counter[str] = Counter()
    original = Checkpoint.read

    def counting(self, name, *args, **kwargs):
        if self.root == bases("llama"):
            reads[name] += 1
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", counting)
    results = weightsteer.build(recipe)
    monkeypatch.undo()
    assert [r.path.name for r in results] == ["a", "b", "c"]
    touched = {n for n in tensors(bases("llama")) if any(f"{t}.weight" in n for t in ATTN_MLP)}
    assert set(reads) == touched and max(reads.values()) == 1, reads
    for output in recipe["outputs"]:
        steers = [Steer(t["adapter"], t["coeff"], t.get("scheme")) for t in output["adapters"]]
        alone = weightsteer.merge(steers, tmp_path / "alone", overwrite=True)
        ours, theirs = tensors(tmp_path / output["path"]), tensors(alone)
        assert all(torch.equal(ours[n], t) for n, t in theirs.items()), output["path"]


def test_recipe_pushes_its_outputs_verified_first(hub, adapters, tmp_path):  # noqa: F811
    from huggingface_hub import snapshot_download

    recipe = _recipe(adapters, tmp_path)
    recipe["outputs"][0]["push"] = "user/honest-formal"
    results = weightsteer.build(recipe)
    pushed = json.loads((tmp_path / "a" / "weightsteer.json").read_text())
    assert pushed["verification"]["ok"] and "verification" not in json.loads((tmp_path / "b" / "weightsteer.json").read_text())
    remote = Path(snapshot_download("user/honest-formal"))
    assert [t["coeff"] for t in json.loads((remote / "weightsteer.json").read_text())["terms"]] == [0.5, -0.3]
    assert len(results) == 3


def test_recipe_file_yaml_and_json_via_cli(adapters, tmp_path):
    (tmp_path / "adapters").mkdir()
    for name in ("lora", "rslora"):
        (tmp_path / "adapters" / name).symlink_to(adapters(name))
    text = (
        "outputs:\n"
        "  - path: out/honest-formal\n"
        "    adapters:\n"
        f"      - {{adapter: adapters/{adapters('lora').name}, coeff: 0.5}}\n"
        f"      - {{adapter: adapters/{adapters('rslora').name}, coeff: -0.3, scheme: linear}}\n"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "recipe.yaml").write_text(text)
    result = CliRunner().invoke(main, ["build", str(tmp_path / "recipe.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [t["coeff"] for t in report[0]["terms"]] == [0.5, -0.3]
    merged = CliRunner().invoke(main, ["merge", f"{adapters('lora')}@0.5", f"{adapters('rslora')}@-0.3", "-o", str(tmp_path / "m"), "-q"])
    assert merged.exit_code == 0, merged.output
    assert (model_logits(tmp_path / "out" / "honest-formal") - model_logits(tmp_path / "m")).abs().max() == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(outputz=[]), "unknown key 'outputz' in the recipe"),
        (lambda r: r["outputs"][1].update(pathh="x"), "unknown key 'pathh' in output 2"),
        (lambda r: r["outputs"][2]["adapters"][0].update(coef=1), "unknown key 'coef' in output 3 adapter 1"),
        (lambda r: r["outputs"][2]["adapters"][0].update(coeff="strong"), "coeff 'strong'; it must be a finite number"),
        (lambda r: r["outputs"][2]["adapters"][0].update(coeff=float("nan")), "must be a finite number"),
        (lambda r: r["outputs"][2]["adapters"][0].update(adapter="./missing"), "there is no folder"),
        (lambda r: r["outputs"][2].update(path=r["outputs"][0]["path"]), "outputs 1 and 3 both write"),
        (lambda r: r["outputs"][2].update(compose="product"), "compose in output 3 must be one of chain, sum"),
        (lambda r: r["outputs"][2].update(adapters=[]), "needs 'adapters'"),
    ],
)
def test_recipe_errors_name_the_key_and_write_nothing(adapters, tmp_path, change, message):
    recipe = _recipe(adapters, tmp_path)
    change(recipe)
    with pytest.raises(weightsteer.RecipeError, match=message) as error:
        weightsteer.build(recipe)
    assert "<dict>" in str(error.value)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_recipe_file_errors_name_the_file(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"outputs": [{"path": "x", "adapters": [{"adapter": "a"}]}], "bases": "y"}))
    result = CliRunner().invoke(main, ["build", str(path)])
    assert result.exit_code == 1 and "unknown key 'bases'" in result.output and str(path) in result.output


def test_recipe_refuses_an_unknown_scheme_before_any_work(adapters, tmp_path):
    recipe = _recipe(adapters, tmp_path)
    recipe["outputs"][2]["adapters"][0]["scheme"] = "cubic"
    with pytest.raises(weightsteer.SchemeError, match="cubic"):
        weightsteer.build(recipe)
    assert not any((tmp_path / n).exists() for n in "abc")


# ---- command line ---------------------------------------------------------------------------------


def test_cli_several_adapters_with_coeff_is_a_usage_error(adapters, tmp_path):
    result = CliRunner().invoke(main, ["merge", str(adapters("lora")), str(adapters("ia3")), "-c", "0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "ADAPTER@COEFF" in result.output and "weightsteer build" in result.output
    result = CliRunner().invoke(main, ["merge", f"{adapters('lora')}@strong", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs a number after the last @" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_compose_sum_and_scheme_for_every_term(adapters, tmp_path):
    args = ["merge", f"{adapters('lora')}@0.5", f"{adapters('ia3')}@-0.3", "--scheme", "delta", "--compose", "sum", "-o", str(tmp_path / "o"), "--json", "--verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "weightsteer.json").read_text())
    assert record["compose"] == "sum" and {t["scheme"]["name"] for t in record["terms"]} == {"delta"}
    assert record["verification"]["ok"] and "at coeffs 0.5, -0.3" in (tmp_path / "o" / "README.md").read_text()


def test_cli_export_lora_of_a_composition(adapters, tmp_path):
    args = ["export-lora", f"{adapters('lora')}@0.5", f"{adapters('rslora')}@-1", "-o", str(tmp_path / "lora"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rank"] == 6 and report["coeff"] is None and [t["coeff"] for t in report["terms"]] == [0.5, -1.0]
    result = CliRunner().invoke(main, [*args[:3], "-c", "2", "-o", str(tmp_path / "other")])
    assert result.exit_code == 2 and "ADAPTER@COEFF" in result.output
