"""Everything in an output folder besides the weights: the shard index, the base's other files (copied
byte for byte, config patched minimally), the provenance record weightsteer.json and the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from . import __version__
from .adapters import Adapter
from .card import base_license, write_card
from .errors import AdapterError, OutputError
from .outputs import LOCAL_PATHS_NAME, PROVENANCE_NAME, copy_support_files, write_index
from .planner import MergePlan
from .resolve import published_reference

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
    base_id: str | None = None,
) -> None:
    """Everything but the weights: index, support files, weightsteer.json (with no local paths: those go to
    .weightsteer-local.json, which push never uploads) and the card."""
    _refuse_broken(plan, result)
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
    copy_support_files(plan.checkpoint, staging, plan.config_patch)
    adapter_shown, adapter_id, adapter_revision, adapter_local = published_reference(adapter_ref, adapter.path)
    base_shown, hub_base, base_revision, base_local = published_reference(base_ref, plan.checkpoint.root)
    provenance = {
        "weightsteer_version": __version__,
        "adapter": adapter_id or adapter_shown,
        "adapter_revision": adapter_revision,
        "adapter_type": adapter.peft_type,
        "base_model": base_id or hub_base or base_shown,
        "base_model_id": base_id or hub_base,
        "base_revision": base_revision if base_id in (None, hub_base) else None,
        "base_license": base_license(plan.checkpoint.root),
        "coeff": result.coeff,
        "scheme": {"name": plan.scheme.name, "formula": plan.scheme.formula},
        "options": dict(options),
        "config_patch": plan.config_patch,
        "result": result.to_dict() | {"path": None},
        "siblings": [{"coeff": r.coeff, "name": r.path.name} for r in results if r is not result],
    }
    (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    local = {k: v for k, v in {"adapter": adapter_local, "base_model": base_local}.items() if v}
    if local:
        (staging / LOCAL_PATHS_NAME).write_text(json.dumps(local, indent=2) + "\n")
    write_card(staging, title=result.path.name)


def _refuse_broken(plan: MergePlan, result: "MergeResult") -> None:
    """No output that is wrong: values that overflowed the output dtype, or a coeff too small to change anything."""
    rounding = result.rounding
    if rounding.overflowed:
        dtype = next(t.dtype for t in plan.edited if t.name == rounding.overflow_tensor)
        raise OutputError(
            f"Merging at coeff {result.coeff:g} overflows {dtype}: {rounding.overflowed:.0f} values become inf, e.g. in "
            f"{rounding.overflow_tensor}, whose largest value is {rounding.overflow_peak:.6g}. Nothing was written; "
            "use dtype='bfloat16' (or float32), or a smaller |coeff|."
        )
    if not result.changed_tensors and result.coeff != 0:
        raise AdapterError(
            f"Merging at coeff {result.coeff:g} changes no tensor: the adapter does change the weights, but at this "
            "coeff every change is smaller than what float32 (the compute dtype) and the output dtype can represent. "
            "Use a larger |coeff|. Nothing was written."
        )
