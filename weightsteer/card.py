"""The model card (README.md) of a merged checkpoint: Hub metadata, provenance, verification, how to load it.

The card is rendered from the folder's weightsteer.json alone, so it can be rewritten after a
verification or for a push without the base or the adapter at hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import yaml
from huggingface_hub.repocard_data import ModelCardData  # not huggingface_hub.repocard: it imports the Hub client (~0.4 s)

from .outputs import CARD_NAME, PROVENANCE_NAME

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE")
# Hub license ids recognised in a LICENSE file: as its first line, or by phrases found in its text.
LICENSE_IDS = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "gpl-3.0", "lgpl-3.0", "cc-by-4.0", "cc-by-sa-4.0"}
LICENSE_PHRASES = {
    "apache-2.0": ("apache license", "version 2.0"),
    "mit": ("mit license",),
    "gpl-3.0": ("gnu general public license", "version 3"),
}
NOT_VERIFIED = {"skipped": True}
WORST_SHOWN = 10
WEIGHTSTEER_URL = "https://pypi.org/project/weightsteer/"
FRONT_MATTER = re.compile(r"\A\s*---\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)  # a card's YAML metadata block


def base_license(root: Path) -> str | None:
    """The base model's license id, from its card's metadata, its config or its LICENSE file; None if unknown."""
    card = root / CARD_NAME
    if card.is_file() and (found := card_metadata(card).get("license")):
        return str(found)
    config = root / "config.json"
    if config.is_file() and isinstance(found := json.loads(config.read_text()).get("license"), str):
        return found
    for name in LICENSE_FILES:
        if (root / name).is_file():
            return _license_from_text((root / name).read_text(errors="replace"))
    return None


def card_metadata(card: Path) -> dict:
    """A model card's YAML metadata; empty where it has none, or none that parses to a mapping."""
    match = FRONT_MATTER.match(card.read_text(encoding="utf-8-sig", errors="replace"))
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _license_from_text(text: str) -> str | None:
    lines = text.strip().splitlines()
    if lines and lines[0].strip().lower() in LICENSE_IDS:
        return lines[0].strip().lower()
    lowered = text.lower()
    return next((name for name, phrases in LICENSE_PHRASES.items() if all(p in lowered for p in phrases)), None)


def record_verification(folder: Path, verification: Mapping, **card_options) -> None:
    """Store a verification summary (`VerifyReport.to_dict()`, or NOT_VERIFIED) in weightsteer.json and
    rewrite the card. card_options go to `write_card`."""
    _record(folder, "verification", _without_local_paths(verification), **card_options)


def record_calibration(folder: Path, calibration: Mapping) -> None:
    """Store how a kl:K coeff was found (`weightsteer.sweep.Calibration.to_dict()`) in weightsteer.json and
    rewrite the card, which then states it."""
    _record(folder, "calibration", dict(calibration))


def _record(folder: Path, key: str, value: dict, **card_options) -> None:
    path = folder / PROVENANCE_NAME
    provenance = json.loads(path.read_text())
    provenance[key] = value
    path.write_text(json.dumps(provenance, indent=2) + "\n")
    write_card(folder, **card_options)


def _without_local_paths(verification: Mapping) -> dict:
    """The summary as published: local folders by name (or Hub id), not by this machine's paths."""
    from .resolve import published_reference

    def shown(ref: object) -> object:
        return published_reference(ref, Path(ref))[0] if isinstance(ref, str) and Path(ref).exists() else ref

    summary = {key: shown(value) if key in ("merged", "adapter", "base") else value for key, value in verification.items()}
    if summary.get("terms"):  # a composition's adapter is its terms' joined by " + "
        summary["terms"] = [dict(t) | {"adapter": shown(t.get("adapter"))} for t in summary["terms"]]
        summary["adapter"] = " + ".join(str(t["adapter"]) for t in summary["terms"])
    return summary


def write_card(
    folder: Path,
    *,
    title: str | None = None,
    repo_id: str | None = None,
    sibling_links: Mapping[float | str, str] | None = None,
) -> None:
    """Write folder/README.md from folder/weightsteer.json.

    title defaults to repo_id or the folder's name; repo_id (when pushing) goes into the load snippets;
    sibling_links maps the coeffs (compositions: the folder names) of checkpoints merged alongside this one to
    their URLs.
    """
    provenance = json.loads((folder / PROVENANCE_NAME).read_text())
    reference = repo_id or "path/to/this/folder"
    sections = [
        _introduction(provenance, title or repo_id or folder.name),
        _siblings(provenance, sibling_links or {}),
        _verification(provenance.get("verification")),
        _loading(reference, repo_id),
    ]
    body = "\n".join(s for s in sections if s)
    (folder / CARD_NAME).write_text(f"---\n{_metadata(provenance).to_yaml()}\n---\n{body}", encoding="utf-8")


def _metadata(provenance: dict) -> ModelCardData:
    # Read from the Hub (cache) or given as base_id; records of weightsteer 0.1 marked Hub bases by a revision.
    base_id = provenance.get("base_model_id", provenance["base_model"] if provenance.get("base_revision") else None)
    types = dict.fromkeys(t["adapter_type"].lower() for t in _terms(provenance))
    return ModelCardData(
        base_model=base_id,
        base_model_relation="finetune" if base_id else None,
        library_name="transformers",
        license=provenance.get("base_license"),
        tags=["weightsteer", "steering", "merged-adapter", *types],
    )


def _terms(provenance: dict) -> list[dict]:
    """Every adapter baked in; records written before compositions hold one, at the top level."""
    if provenance.get("terms"):
        return provenance["terms"]
    keys = ("adapter", "adapter_revision", "adapter_type", "coeff", "scheme")
    return [{k: provenance.get(k) for k in keys}]


def _introduction(provenance: dict, title: str) -> str:
    result = provenance["result"]
    rounding = result["rounding"]
    terms = _terms(provenance)
    base = _reference(provenance["base_model"], provenance.get("base_revision"))
    if len(terms) == 1:
        term = terms[0]
        adapter = _reference(term["adapter"], term.get("adapter_revision"))
        what = f"the {term['adapter_type']} adapter {adapter} baked into its weights at\ncoeff **{term['coeff']:g}**"
        rows = [
            ("adapter", adapter),
            ("adapter type", term["adapter_type"]),
            ("coeff", f"{term['coeff']:g}"),
            ("scheme", f"`{term['scheme']['name']}`: {term['scheme']['formula']}"),
        ]
    else:
        what = f"{len(terms)} adapters baked into its weights, each at its own coeff,"
        rows = [("adapters", _terms_table(terms)), ("composition", _COMPOSE_TEXT[provenance.get("compose", "chain")])]
    rows = [("base model", base), *rows, ("weightsteer", provenance["weightsteer_version"])]
    rows += [
        ("tensors changed", str(len(result["changed_tensors"]))),
        (
            "rounding",
            f"{rounding['swallowed_share']:.1%} of changed elements rounded back to the base value; "
            f"relative error of the change {rounding['relative_error']:.2%}",
        ),
    ]
    if calibration := provenance.get("calibration"):
        rows.append(("calibration", _calibration_text(calibration)))
    if dropped := result.get("dropped_files"):
        files = ", ".join(f"`{n}`" for n in dropped)
        rows.append(("not copied from the base", f"{files}: weights in other formats or copies, which this merge did not rewrite"))
    table = "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    return f"""
# {title}

{base} with {what} by [weightsteer]({WEIGHTSTEER_URL}). It loads and runs like the base model: no PEFT,
no extra compute.

{table}
"""


def _calibration_text(calibration: dict) -> str:
    """How a kl:K coeff was found, e.g. "coeff 0.709, calibrated to p95 KL 1.0 nat on 16 prompts (...)"."""
    point = calibration["point"]
    return (
        f"coeff {calibration['coeff']:g}, calibrated to p95 KL {float(calibration['target_kl'])} nat on "
        f"{calibration['prompts']} prompts ({calibration['tokens']} greedy tokens each; measured p95 KL "
        f"{point['kl_p95']:.3g}, mean {point['kl_mean']:.3g}) by `weightsteer sweep`"
    )


_COMPOSE_TEXT = {
    "chain": "in the listed order: consecutive adapters of one family add up as PEFT runs them together; "
    "another family applies to the result",
    "sum": "W + Σ (Wᵢ − W): every change computed against the base weight",
}


def _terms_table(terms: list[dict]) -> str:
    """The terms as one table cell (Markdown tables have no nested tables)."""
    return "<br>".join(
        f"{i}. {_reference(t['adapter'], t.get('adapter_revision'))} ({t['adapter_type']}) at coeff **{t['coeff']:g}**, "
        f"scheme `{t['scheme']['name']}`: {t['scheme']['formula']}"
        for i, t in enumerate(terms, 1)
    )


def _reference(ref: str, revision: str | None) -> str:
    return f"`{ref}`" + (f" (revision `{revision}`)" if revision else "")


def _siblings(provenance: dict, links: Mapping[float | str, str]) -> str:
    siblings = provenance.get("siblings") or []
    if not siblings:
        return ""
    items = []
    for sibling in sorted(siblings, key=lambda s: (s["coeff"] is None, s["coeff"] or 0, s["name"])):
        coeff = sibling["coeff"]
        label = f"coeff {coeff:g}" if coeff is not None else _sibling_terms(sibling)
        link = links.get(coeff) if coeff is not None else links.get(sibling["name"])
        items.append(f"- {label}: " + (f"[{sibling['name']}]({link})" if link else f"`{sibling['name']}`"))
    if all(s["coeff"] is not None for s in siblings):
        return "## Other strengths\n\nMerged from the same adapter in the same run:\n\n" + "\n".join(items) + "\n"
    return "## Other outputs\n\nMerged from the same base in the same run:\n\n" + "\n".join(items) + "\n"


def _sibling_terms(sibling: dict) -> str:
    return " + ".join(f"{t['adapter']}@{t['coeff']:g}" for t in sibling.get("terms", []))


def _verification(summary: dict | None) -> str:
    heading = "## Verification\n\n"
    if summary is None:
        return heading + "Not verified yet: run `weightsteer verify <this folder>`.\n"
    if summary.get("skipped"):
        return heading + "**Not verified**: pushed with `--no-verify`.\n"
    modules = summary["checks"]
    worst = max(modules, key=lambda c: c["ratio"], default=None)
    rows = [
        ("result", "**passed**" if summary["ok"] else "**FAILED**"),
        (
            f"adapted tensors at {_at(summary)}: PEFT's forward on random probes (or the stored tensor) vs merged",
            f"{len(modules)} checked"
            + (f"; worst `{worst['tensor']}` at {worst['ratio']:.3g}× its tolerance" if worst else ""),
        ),
        (
            "tensors the adapter does not touch",
            f"{summary['untouched']} equal to the base byte for byte, {len(summary['changed_untouched'])} differ",
        ),
    ]
    if logits := summary.get("logits"):
        rows.append(
            (
                f"logits, unmerged (PEFT) vs merged, {logits['positions']} positions",
                f"max abs Δ {logits['max_abs']:.3g}; KL mean {logits['kl_mean']:.3g}, p95 {logits['kl_p95']:.3g}; "
                f"top-1 agreement {logits['top1_agreement']:.1%}; greedy agreement {logits['greedy_agreement']:.1%}",
            )
        )
    table = "| check | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    details = "\n".join(
        f"| `{c['tensor']}` | {c['kind']} | {c['max_abs']:.3g} | {c['max_rel']:.3g} | {c['ratio']:.3g} |"
        for c in sorted(modules, key=lambda c: -c["ratio"])[:WORST_SHOWN]
    )
    return (
        f"{heading}Checked with `weightsteer verify` {summary['weightsteer_version']}.\n\n{table}\n\n"
        f"Worst tensors (error / tolerance above 1 fails):\n\n"
        f"| tensor | kind | max abs error | max rel error | error / tolerance |\n|---|---|---|---|---|\n{details}\n"
    )


def _at(summary: dict) -> str:
    """"coeff c", or every term's coeff for a composition."""
    if summary.get("coeff") is not None:
        return f"coeff {summary['coeff']:g}"
    return "coeffs " + ", ".join(f"{t['coeff']:g}" for t in summary.get("terms", []))


def _loading(reference: str, repo_id: str | None) -> str:
    download = f"hf download {repo_id} --local-dir model\n" if repo_id else ""
    folder = "model" if repo_id else reference
    return f"""## Load it

transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{reference}")
tokenizer = AutoTokenizer.from_pretrained("{reference}")
```

vLLM:

```bash
vllm serve {reference}
```

llama.cpp (convert to GGUF with the script from the llama.cpp repository):

```bash
{download}python convert_hf_to_gguf.py {folder} --outfile model.gguf
```
"""
