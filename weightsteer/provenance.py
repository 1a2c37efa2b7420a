"""Everything in an output folder besides the weights: the shard index, the base's other files (copied
byte for byte, config patched minimally), the provenance record weightsteer.json and the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from . import __version__
from .adapters import Adapter
from .card import base_license, write_card
from .errors import AdapterError
from .outputs import PROVENANCE_NAME, copy_support_files, copy_tokenizer_files, write_index
from .planner import MergePlan
from .resolve import snapshot_revision

if TYPE_CHECKING:
    from .merge import MergeResult

ROUNDING_WARN_SHARE = 0.25


def finish_output(
    plan: MergePlan,
    adapter: Adapter,
    adapter_ref: str,
    base_ref: str,
    options: Mapping[str, object],
    result: "MergeResult",
    staging: Path,
    results: Sequence["MergeResult"],
) -> None:
    if not result.changed_tensors and result.coeff != 0:
        raise AdapterError(
            f"Merging {adapter_ref} at coeff {result.coeff} changes no tensor: every delta is zero. "
            "Is the adapter still at its initialisation (e.g. LoRA B = 0)?"
        )
    out_dtype = {t.dtype for t in plan.edited} or {"unchanged"}
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
    # A grown vocabulary (added tokens) needs the tokenizer that knows them: the adapter's, where it ships one.
    resized = any(key.endswith("vocab_size") for key in plan.config_patch)
    tokenizer_from_adapter = copy_tokenizer_files(adapter.path, staging) if resized else []
    provenance = {
        "weightsteer_version": __version__,
        "adapter": adapter_ref,
        "adapter_revision": snapshot_revision(adapter.path),
        "adapter_type": adapter.peft_type,
        "base_model": base_ref,
        "base_revision": snapshot_revision(plan.checkpoint.root),
        "base_license": base_license(plan.checkpoint.root),
        "coeff": result.coeff,
        "scheme": {"name": plan.scheme.name, "formula": plan.scheme.formula},
        "options": dict(options),
        "config_patch": plan.config_patch,
        "tokenizer_from_adapter": tokenizer_from_adapter,
        "result": result.to_dict() | {"path": None},
        "siblings": [{"coeff": r.coeff, "name": r.path.name} for r in results if r is not result],
    }
    (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    write_card(staging, title=result.path.name)
