"""Everything in an output folder besides the weights: the shard index, the base's other files (copied
byte for byte, config patched minimally), the provenance record weightsteer.json and the model card."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import __version__
from .card import base_license, write_card
from .errors import AdapterError, OutputError
from .outputs import LOCAL_PATHS_NAME, PROVENANCE_NAME, copy_support_files, copy_tokenizer_files, write_index
from .planner import Composition, MergePlan, Term
from .resolve import published_reference

if TYPE_CHECKING:
    from .merge import MergeResult, Opened

ROUNDING_WARN_SHARE = 0.25


def finish_output(
    plan: MergePlan,
    opened: "Opened",
    composition: Composition,
    result: "MergeResult",
    staging: Path,
    results: Sequence["MergeResult"],
    base_id: str | None = None,
) -> None:
    """Everything but the weights: index, support files, weightsteer.json (with no local paths: those go to
    .weightsteer-local.json, which push never uploads) and the card."""
    _refuse_broken(plan, composition, result)
    out_dtype = {t.dtype for t in plan.edited + plan.added} or {"unchanged"}
    if result.rounding.swallowed_share > ROUNDING_WARN_SHARE:
        result.warnings.append(
            f"{result.rounding.summary('/'.join(sorted(out_dtype)))}. Most of the change is lost; "
            "use a larger |coeff| or --dtype float32."
        )
    if plan.checkpoint.index is not None:
        weight_map = {t.name: shard for shard, tensors in plan.shards.items() for t in tensors}
        total = sum(t.nbytes for tensors in plan.shards.values() for t in tensors)
        write_index(staging, weight_map, total, plan.checkpoint.index.get("metadata", {}))
    _, result.dropped_files = copy_support_files(plan.checkpoint, staging, plan.config_patch)
    # A grown vocabulary (added tokens) needs the tokenizer that knows them: the adapters', where they ship one.
    resized = any(key.endswith("vocab_size") for key in plan.config_patch)
    tokenizer_from_adapter = [n for t in composition.terms for n in copy_tokenizer_files(plan.adapters[t.adapter].path, staging)] if resized else []
    published, names = _published_adapters(plan, opened)
    terms = [_term_record(plan, published[term.adapter], term) for term in composition.terms]
    single = terms[0] if len(terms) == 1 else None
    base_shown, hub_base, base_revision, base_local = published_reference(opened.base_ref, plan.checkpoint.root)
    provenance = {
        "weightsteer_version": __version__,
        # A one-adapter merge keeps these top-level keys; a composition has None here and every term in "terms".
        "adapter": single and single["adapter"],
        "adapter_revision": single and single["adapter_revision"],
        "adapter_type": single["adapter_type"] if single else result.adapter_type,
        "base_model": base_id or hub_base or base_shown,
        "base_model_id": base_id or hub_base,
        "base_revision": base_revision if base_id in (None, hub_base) else None,
        "base_license": base_license(plan.checkpoint.root),
        "coeff": single and single["coeff"],
        "scheme": single and single["scheme"],
        "terms": terms,
        "compose": composition.compose,
        "options": dict(opened.options),
        "config_patch": plan.config_patch,
        "tokenizer_from_adapter": tokenizer_from_adapter,
        "result": result.to_dict() | {"path": None, "terms": _published_terms(result, names), "warnings": _published_text(result.warnings, names)},
        "siblings": [{"coeff": r.coeff, "name": r.path.name, "terms": _published_terms(r, names)} for r in results if r is not result],
    }
    (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    local_terms = [published[term.adapter][2] for term in composition.terms]
    local = {"adapter": single and local_terms[0], "base_model": base_local, "terms": local_terms if any(local_terms) else None}
    local = {k: v for k, v in local.items() if v}
    if local:
        (staging / LOCAL_PATHS_NAME).write_text(json.dumps(local, indent=2) + "\n")
    write_card(staging, title=result.path.name)


def _refuse_broken(plan: MergePlan, composition: Composition, result: "MergeResult") -> None:
    """No output that is wrong: values that overflowed the output dtype, or coeffs too small to change anything
    (every adapter was checked to change the weights before streaming, see merge._refuse_zero_change)."""
    rounding = result.rounding
    at = _at(composition)
    if rounding.overflowed:
        dtype = next(t.dtype for t in plan.edited if t.name == rounding.overflow_tensor)
        raise OutputError(
            f"Merging at {at} overflows {dtype}: {rounding.overflowed:.0f} values become inf, e.g. in "
            f"{rounding.overflow_tensor}, whose largest value is {rounding.overflow_peak:.6g}. Nothing was written; "
            "use dtype='bfloat16' (or float32), or a smaller |coeff|."
        )
    if not result.changed_tensors and any(t.coeff != 0 for t in composition.terms):
        which = "the adapter does change the weights, but at this coeff" if len(composition.terms) == 1 else (
            "the adapters do change the weights, but at these coeffs"
        )
        raise AdapterError(
            f"Merging at {at} changes no tensor: {which} every change is smaller than what float32 (the compute dtype) and the output dtype can represent. "
            "Use a larger |coeff|. Nothing was written."
        )


def _at(composition: Composition) -> str:
    """"coeff c" for one term; "coeffs c₁, c₂" for a composition."""
    coeffs = [f"{t.coeff:g}" for t in composition.terms]
    return ("coeff " if len(coeffs) == 1 else "coeffs ") + ", ".join(coeffs)


def published_report(plan: MergePlan, opened: "Opened", record: dict) -> tuple[dict, dict]:
    """A report (e.g. export-lora's) as published, with its typed adapter paths replaced by published names and
    no local paths; and those paths, for the sidecar that push never uploads."""
    published, names = _published_adapters(plan, opened)
    shown, hub_base, base_revision, base_local = published_reference(opened.base_ref, plan.checkpoint.root)
    public = record | {
        "adapter": published[0][0] if len(published) == 1 else None,
        "base_model": hub_base or shown,
        "base_revision": base_revision,
        "terms": [term | {"adapter": names.get(term["adapter"], term["adapter"])} for term in record.get("terms", [])],
        "warnings": _published_text(record.get("warnings", []), names),
    }
    local = {"adapters": [p[2] for p in published if p[2]], "base_model": base_local}
    return public, {k: v for k, v in local.items() if v}


def _published_adapters(plan: MergePlan, opened: "Opened") -> tuple[list[tuple[str, str | None, str | None]], dict[str, str]]:
    """Per adapter: (name as published: its Hub id or folder name, Hub commit, absolute local path or None); and
    each adapter reference as typed → its name as published."""
    found = []
    for ref, adapter in zip(opened.refs, plan.adapters):
        if not adapter.path.exists():  # a Python vector object: its description, no path
            found.append((ref, None, None))
            continue
        shown, hub_id, revision, local = published_reference(ref, adapter.path)
        found.append((hub_id or shown, revision, local))
    return found, {ref: name for ref, (name, _, _) in zip(opened.refs, found)}


def _term_record(plan: MergePlan, published: tuple[str, str | None, str | None], term: Term) -> dict:
    adapter = plan.adapters[term.adapter]
    return {
        "adapter": published[0],
        "adapter_revision": published[1],
        "adapter_type": adapter.peft_type,
        "coeff": term.coeff,
        "scheme": {"name": term.scheme.name, "formula": term.scheme.formula},
    }


def _published_text(lines: Sequence[str], names: dict[str, str]) -> list[str]:
    """Messages as published: every adapter path the user typed replaced by its published name."""
    typed = sorted((ref for ref in names if os.sep in ref), key=len, reverse=True)
    for ref in typed:
        lines = [line.replace(ref, names[ref]) for line in lines]
    return list(lines)


def _published_terms(result: "MergeResult", names: dict[str, str]) -> list[dict]:
    return [asdict(t) | {"adapter": names.get(t.adapter, t.adapter)} for t in result.terms]
