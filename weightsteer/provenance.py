"""Everything in an output folder besides the weights: the shard index, the base's other files (copied
byte for byte, config patched minimally), the provenance record weightsteer.json and the model card."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import __version__
from .card import base_license, write_card
from .errors import AdapterError
from .outputs import PROVENANCE_NAME, copy_support_files, copy_tokenizer_files, write_index
from .planner import Composition, MergePlan, Term
from .resolve import snapshot_revision

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
) -> None:
    if not result.changed_tensors and any(t.coeff != 0 for t in composition.terms):
        named = ", ".join(f"{t.adapter} at coeff {t.coeff:g}" for t in result.terms)
        raise AdapterError(
            f"Merging {named} changes no tensor: every delta is zero. "
            "Is the adapter still at its initialisation (e.g. LoRA B = 0)?"
        )
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
    terms = [_term_record(plan, opened, term) for term in composition.terms]
    single = terms[0] if len(terms) == 1 else None
    provenance = {
        "weightsteer_version": __version__,
        # A one-adapter merge keeps these top-level keys; a composition has None here and every term in "terms".
        "adapter": single and single["adapter"],
        "adapter_revision": single and single["adapter_revision"],
        "adapter_type": single["adapter_type"] if single else result.adapter_type,
        "base_model": opened.base_ref,
        "base_revision": snapshot_revision(plan.checkpoint.root),
        "base_license": base_license(plan.checkpoint.root),
        "coeff": single and single["coeff"],
        "scheme": single and single["scheme"],
        "terms": terms,
        "compose": composition.compose,
        "options": dict(opened.options),
        "config_patch": plan.config_patch,
        "tokenizer_from_adapter": tokenizer_from_adapter,
        "result": result.to_dict() | {"path": None},
        "siblings": [{"coeff": r.coeff, "name": r.path.name, "terms": [asdict(t) for t in r.terms]} for r in results if r is not result],
    }
    (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    write_card(staging, title=result.path.name)


def _term_record(plan: MergePlan, opened: "Opened", term: Term) -> dict:
    adapter = plan.adapters[term.adapter]
    return {
        "adapter": opened.refs[term.adapter],
        "adapter_revision": snapshot_revision(adapter.path),
        "adapter_type": adapter.peft_type,
        "coeff": term.coeff,
        "scheme": {"name": term.scheme.name, "formula": term.scheme.formula},
    }
