"""The model card (README.md) of a merged checkpoint: Hub metadata, provenance, verification, how to load it.

The card is rendered from the folder's weightsteer.json alone, so it can be rewritten after a
verification or for a push without the base or the adapter at hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load

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


def base_license(root: Path) -> str | None:
    """The base model's license id, from its card's metadata, its config or its LICENSE file; None if unknown."""
    card = root / CARD_NAME
    if card.is_file():
        try:
            found = (metadata_load(card) or {}).get("license")
        except yaml.YAMLError:
            found = None
        if found:
            return str(found)
    config = root / "config.json"
    if config.is_file() and isinstance(found := json.loads(config.read_text()).get("license"), str):
        return found
    for name in LICENSE_FILES:
        if (root / name).is_file():
            return _license_from_text((root / name).read_text(errors="replace"))
    return None


def _license_from_text(text: str) -> str | None:
    lines = text.strip().splitlines()
    if lines and lines[0].strip().lower() in LICENSE_IDS:
        return lines[0].strip().lower()
    lowered = text.lower()
    return next((name for name, phrases in LICENSE_PHRASES.items() if all(p in lowered for p in phrases)), None)


def record_verification(folder: Path, verification: Mapping, **card_options) -> None:
    """Store a verification summary (`VerifyReport.to_dict()`, or NOT_VERIFIED) in weightsteer.json and
    rewrite the card. card_options go to `write_card`."""
    record(folder, "verification", verification, **card_options)


def record(folder: Path, key: str, value: Mapping, **card_options) -> None:
    """Store `value` under `key` in folder/weightsteer.json and rewrite the card (card_options go to `write_card`)."""
    path = folder / PROVENANCE_NAME
    provenance = json.loads(path.read_text())
    provenance[key] = dict(value)
    path.write_text(json.dumps(provenance, indent=2) + "\n")
    write_card(folder, **card_options)


def write_card(
    folder: Path,
    *,
    title: str | None = None,
    repo_id: str | None = None,
    sibling_links: Mapping[float, str] | None = None,
) -> None:
    """Write folder/README.md from folder/weightsteer.json.

    title defaults to repo_id or the folder's name; repo_id (when pushing) goes into the load snippets;
    sibling_links maps the coeffs of checkpoints merged alongside this one to their URLs.
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
    ModelCard(f"---\n{_metadata(provenance).to_yaml()}\n---\n{body}").save(folder / CARD_NAME)


def _metadata(provenance: dict) -> ModelCardData:
    on_hub = provenance.get("base_revision") is not None  # the merge read the base from the Hub
    return ModelCardData(
        base_model=provenance["base_model"] if on_hub else None,
        base_model_relation="finetune" if on_hub else None,
        library_name="transformers",
        license=provenance.get("base_license"),
        tags=["weightsteer", "steering", "merged-adapter", provenance["adapter_type"].lower()],
    )


def _introduction(provenance: dict, title: str) -> str:
    scheme = provenance["scheme"]
    result = provenance["result"]
    rounding = result["rounding"]
    adapter = _reference(provenance["adapter"], provenance.get("adapter_revision"))
    base = _reference(provenance["base_model"], provenance.get("base_revision"))
    return f"""
# {title}

{base} with the {provenance["adapter_type"]} adapter {adapter} baked into its weights at
coeff **{provenance["coeff"]:g}** by [weightsteer]({WEIGHTSTEER_URL}). It loads and runs like the base model: no PEFT,
no extra compute.

| | |
|---|---|
| base model | {base} |
| adapter | {adapter} |
| adapter type | {provenance["adapter_type"]} |
| coeff | {provenance["coeff"]:g} |
| scheme | `{scheme["name"]}`: {scheme["formula"]} |
| weightsteer | {provenance["weightsteer_version"]} |
| tensors changed | {len(result["changed_tensors"])} |{_calibration_row(provenance.get("calibration"))}
| rounding | {rounding["swallowed_share"]:.1%} of changed elements rounded back to the base value; \
relative error of the change {rounding["relative_error"]:.2%} |
"""


def _calibration_row(calibration: dict | None) -> str:
    """The table row that says how a kl:K coeff was found (empty without a calibration)."""
    if not calibration:
        return ""
    point = calibration["point"]
    return (
        f"\n| calibration | coeff {calibration['coeff']:g}, calibrated to p95 KL {float(calibration['target_kl'])} nat on "
        f"{calibration['prompts']} prompts ({calibration['tokens']} greedy tokens each; measured p95 KL "
        f"{point['kl_p95']:.3g}, mean {point['kl_mean']:.3g}) by `weightsteer sweep` |"
    )


def _reference(ref: str, revision: str | None) -> str:
    return f"`{ref}`" + (f" (revision `{revision}`)" if revision else "")


def _siblings(provenance: dict, links: Mapping[float, str]) -> str:
    siblings = provenance.get("siblings") or []
    if not siblings:
        return ""
    names = {s["coeff"]: s["name"] for s in siblings}
    items = [f"- coeff {c:g}: " + (f"[{n}]({links[c]})" if c in links else f"`{n}`") for c, n in sorted(names.items())]
    return "## Other strengths\n\nMerged from the same adapter in the same run:\n\n" + "\n".join(items) + "\n"


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
            f"adapted tensors at coeff {summary['coeff']:g}: PEFT's forward on random probes (or the stored tensor) vs merged",
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
