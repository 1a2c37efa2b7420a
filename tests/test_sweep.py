"""`weightsteer sweep` and `merge --coeff kl:K` on the real SmolLM2-135M-Instruct (as the quickstart uses it).

The oracle is plain PEFT: the LoRA strength set by hand on every layer (scaling → c·scaling), greedy decoding one
prompt at a time without a cache, and full forwards with the adapter on and off. Needs the SmolLM2 safetensors
base (`bash tests/compat/setup_compat.sh smollm2`, which CI runs first); skipped without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner

import weightsteer
from weightsteer.cli import main
from weightsteer.errors import SweepError
from weightsteer.calibration import KLTarget, parse_coeff
from weightsteer.sweep import default_prompts, read_pairs, read_prompts

COMPAT = Path(os.environ.get("WEIGHTSTEER_COMPAT_DIR") or Path.home() / ".cache" / "weightsteer-compat")
BASE = COMPAT / "smollm2" / "base"
PROMPTS = default_prompts()[:3]
TOKENS = 8
COEFFS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
PAIRS = [
    {"prompt": "How was your weekend?", "positive": "It was wonderful!", "negative": "It was awful."},
    {"prompt": "Describe the city you live in.", "positive": "Bright and friendly.", "negative": "Grey and cold."},
]
NUMBER, MAYBE_NUMBER = {"type": "number"}, {"type": ["number", "null"]}
METRICS = ("coeff", "kl_mean", "kl_p50", "kl_p95", "kl_max", "nll_base")
SCHEMA = {  # sweep.json as issue 11 defines it
    "type": "object",
    "required": ["adapter", "base", "scheme", "tokens", "prompts", "target_kl", "c_pos", "c_neg", "points"],
    "properties": {
        "adapter": {"type": "string"},
        "base": {"type": "string"},
        "scheme": {"type": "string"},
        "tokens": {"type": "integer"},
        "prompts": {"type": "integer"},
        "target_kl": MAYBE_NUMBER,
        "c_pos": MAYBE_NUMBER,
        "c_neg": MAYBE_NUMBER,
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [*METRICS, "distinct2", "margin", "samples"],
                "properties": {
                    **{k: NUMBER for k in METRICS},
                    "distinct2": MAYBE_NUMBER,
                    "margin": MAYBE_NUMBER,
                    "samples": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def base() -> Path:
    if not (BASE / "weightsteer-base.json").is_file():
        pytest.skip(f"needs the SmolLM2 base in {BASE}: run `bash tests/compat/setup_compat.sh smollm2`")
    return BASE


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """A rank-4 LoRA on q, v and down with B perturbed away from its zero init (seconds, no training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sweep") / "adapter"
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.08)
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))
    return folder


@pytest.fixture(scope="module")
def report(adapter):
    return weightsteer.sweep(adapter, coeffs=COEFFS, prompts=PROMPTS, tokens=TOKENS)


@pytest.fixture(scope="module")
def reference(base, adapter):
    """Plain PEFT: the base with the adapter loaded, and the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    return model.eval(), AutoTokenizer.from_pretrained(base)


@pytest.fixture(scope="module")
def budget(report) -> float:
    """A KL budget between the sweep's points at 1 and 2, so both poles reach it."""
    return math.sqrt(report.point(1.0).kl_p95 * report.point(2.0).kl_p95)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def greedy_and_kl(model, tokenizer, prompt: str, coeff: float) -> tuple[str, torch.Tensor]:
    """One prompt, no cache: greedy tokens with every LoRA scaling multiplied by coeff by hand, then KL(p_c ‖ p_0)
    at every generated position from full forwards with the adapter at coeff and disabled."""
    from peft.tuners.lora import LoraLayer

    ids = chat_ids(tokenizer, prompt)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    trained = [m.scaling["default"] for m in layers]
    for layer, scale in zip(layers, trained):
        layer.scaling["default"] = coeff * scale
    try:
        with torch.no_grad():
            sequence = ids
            for _ in range(TOKENS):
                token = model(input_ids=sequence).logits[0, -1].argmax()
                sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
                if token == tokenizer.eos_token_id:
                    break
            steered = model(input_ids=sequence).logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
    finally:
        for layer, scale in zip(layers, trained):
            layer.scaling["default"] = scale
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=sequence).logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
    text = tokenizer.decode(sequence[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return text, (steered.exp() * (steered - base)).sum(-1)


def test_coeff_zero_is_the_base(report, reference):
    model, tokenizer = reference
    zero = report.point(0.0)
    assert zero.kl_mean == zero.kl_p95 == zero.kl_max == 0.0
    with torch.no_grad(), model.disable_adapter():
        for prompt, sample in zip(PROMPTS, zero.samples, strict=True):
            ids = chat_ids(tokenizer, prompt)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False)
            assert sample == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_kl_grows_with_strength_on_both_poles(report):
    for sign in (1, -1):
        kl = [report.point(sign * m).kl_p95 for m in (0.5, 1.0, 2.0)]
        assert 0 < kl[0] < kl[1] < kl[2], (sign, kl)
    assert [p.coeff for p in report.points] == sorted(COEFFS)


def test_kl_p95_matches_a_plain_peft_recomputation(report, reference):
    model, tokenizer = reference
    texts, kls = zip(*(greedy_and_kl(model, tokenizer, p, -1.0) for p in PROMPTS))
    point = report.point(-1.0)
    assert list(texts) == point.samples
    expected = torch.quantile(torch.cat(kls).double(), 0.95).item()
    assert point.kl_p95 == pytest.approx(expected, rel=1e-4)


def test_cli_sweep_writes_json_plot_report_and_finds_both_poles(adapter, budget, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "out"
    args = ["sweep", str(adapter), "--coeffs=-2,-1,1,2", "--prompts", str(tmp_path / "prompts.txt"), "--tokens", str(TOKENS)]
    args += ["--pairs", str(tmp_path / "pairs.jsonl"), "--target-kl", repr(budget), "-o", str(out), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert json.loads(result.stdout) == data
    jsonschema.validate(data, SCHEMA)
    assert data["prompts"] == 3 and data["tokens"] == TOKENS and data["target_kl"] == budget
    assert all(p["margin"] is not None for p in data["points"])
    coeffs = [p["coeff"] for p in data["points"]]
    assert coeffs == sorted(coeffs) and data["c_pos"] > 0 > data["c_neg"] and {data["c_pos"], data["c_neg"]} <= set(coeffs)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| coeff | kl_mean |" in (out / "report.md").read_text() and "(c_pos)" in (out / "report.md").read_text()

    remeasured = weightsteer.sweep(adapter, coeffs=[data["c_pos"], data["c_neg"]], prompts=PROMPTS, tokens=TOKENS)
    for point in remeasured.points:
        assert abs(point.kl_p95 - budget) <= 0.02 * budget, (point.coeff, point.kl_p95, budget)


def test_merge_at_a_kl_budget_records_the_calibration(adapter, budget, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "merged"
    args = ["merge", str(adapter), "--coeff", f"kl:{budget!r}", "--kl-prompts", str(tmp_path / "prompts.txt")]
    result = CliRunner().invoke(main, [*args, "--kl-tokens", str(TOKENS), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "weightsteer.json").read_text())
    calibration = provenance["calibration"]
    assert calibration["coeff"] == provenance["coeff"] > 0
    assert calibration["target_kl"] == budget and calibration["pole"] == "positive" and calibration["metric"] == "kl_p95"
    assert calibration["prompts"] == 3 and calibration["tokens"] == TOKENS
    digest = hashlib.sha256(json.dumps(PROMPTS, ensure_ascii=False).encode()).hexdigest()
    assert calibration["prompts_sha256"] == digest
    assert abs(calibration["point"]["kl_p95"] - budget) <= 0.02 * budget
    card = (out / "README.md").read_text()
    assert f"coeff {provenance['coeff']:g}, calibrated to p95 KL {budget} nat on 3 prompts" in card


# ---- no model needed ------------------------------------------------------------------------------


def test_coeff_parsing():
    assert parse_coeff("0.5") == 0.5 and parse_coeff("-1") == -1.0
    assert parse_coeff("kl:1.0") == KLTarget(1.0, 1) and parse_coeff("-kl:0.5") == KLTarget(0.5, -1)
    for bad in ("kl:0", "kl:-1", "kl:x", "abc", "nan"):
        with pytest.raises(SweepError):
            parse_coeff(bad)
    result = CliRunner().invoke(main, ["merge", "adapter", "-o", "out", "--coeff", "kl:x"])
    assert result.exit_code == 2 and "kl:1.0" in result.output and "Traceback" not in result.output


def test_sweep_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    result = CliRunner().invoke(main, ["sweep", "adapter", "-o", str(tmp_path)])
    assert result.exit_code == 1 and "holds files a sweep did not write (model.safetensors)" in result.output


def test_prompt_and_pair_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "id": 2}\n')
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"] and read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "positive": "b", "negative": "c"}\n{"prompt": "a"}\n')
    with pytest.raises(SweepError, match=r"bad.jsonl, line 2: needs string field\(s\) 'positive', 'negative'"):
        read_pairs(tmp_path / "bad.jsonl")


def test_merge_at_a_kl_budget_refuses_an_existing_output_before_calibrating(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "no-adapter"), "--coeff", "kl:1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "exists already; pass --overwrite" in result.output
