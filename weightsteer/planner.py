"""Decide, from headers alone, which base tensors a merge changes and what the output looks like.

The plan maps every output tensor to its source tensor in the base and, for changed tensors, to the
`Change` each adapter makes to it. One plan serves several outputs (a recipe), each a `Composition` of
terms (adapter, coeff, scheme); `MergePlan.edit` turns a composition into the ordered `Step`s that compute
one tensor. Nothing here reads tensor data, so a bad adapter/base pairing is reported before any output
exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .adapters import Adapter
from .adapters.base import AdapterFamily, ModuleState, Scheme, ShapeLookup
from .checkpoint import DTYPE_CODES, DTYPES, FLOAT_CODES, Checkpoint, TensorInfo
from .errors import AdapterError, BaseModelError
from .names import CheckpointNames, StoredSlice, names_for

HEAD = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")
# transformers architectures whose projections are Conv1D (weight stored in×out), and those projections.
CONV1D_MODELS = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
CONV1D_MODULES = (".c_attn", ".c_proj", ".c_fc", ".q_attn")
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".g_idx", ".SCB", ".weight_format", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4", ".weight_scale")


@dataclass
class Change:
    """One adapter's change to one output tensor, at any coeff: the fp32 tensor in, the changed tensor out."""

    family: AdapterFamily
    state: ModuleState | None = None
    part: str = "weight"  # "weight", "bias" or "replace"
    trained: torch.Tensor | None = None  # the stored tensor, for part == "replace"

    def to(self, device: torch.device, moved: dict[int, torch.Tensor]) -> None:
        """Move the adapter tensors; `moved` (by id) keeps one copy of tensors shared across modules."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(device)
            return moved[id(tensor)]

        if self.trained is not None:
            self.trained = move(self.trained)
        if self.state is not None:
            self.state.tensors = {name: move(t) for name, t in self.state.tensors.items()}

    def __call__(self, base: torch.Tensor, scheme: Scheme, c: float) -> torch.Tensor:
        if self.part == "replace":
            if not scheme.interpolates_replacements:
                return self.trained
            return base + c * (self.trained - base)
        transposed = self.part == "weight" and self.state.fan_in_fan_out
        original = base.T if transposed else base
        compute = self.family.weight if self.part == "weight" else self.family.bias
        if scheme.apply is None:  # delta: W + c(W₁ − W)
            result = original + c * (compute(self.state, original) - original)
        else:
            result = compute(scheme.apply(self.state, c), original)
        return result.T if transposed else result


COMPOSE_MODES = ("chain", "sum")


@dataclass(frozen=True)
class Term:
    """One adapter of an output (its index in MergePlan.adapters) at its own coeff and scheme."""

    adapter: int
    coeff: float
    scheme: Scheme

    @property
    def is_noop(self) -> bool:
        """coeff 0 under a scheme that gives the base there: the term changes nothing."""
        return self.coeff == 0 and self.scheme.base_at_zero


@dataclass(frozen=True)
class Composition:
    """What one output bakes in: its terms in order, and how they combine.

    chain: consecutive terms of one family whose adapters add up in PEFT (`composes_additively`) act as
      one PEFT model with all of them active, W + Σ (fᵢ(W) − W), each against the same weight; anything
      else applies to the result of what came before (IA3 scalings multiply; another family chains).
    sum: W + Σ (fᵢ(W) − W), every term against the base, whatever its family.
    Per tensor, only the terms that change it count ("consecutive" among those), and a term at coeff 0 under
    a scheme that gives the base there is left out, so it changes nothing.
    """

    terms: tuple[Term, ...]
    compose: str = "chain"


@dataclass(frozen=True)
class Step:
    """One term's change to one tensor, at the term's coeff."""

    adapter: int  # index in MergePlan.adapters
    change: Change
    scheme: Scheme
    coeff: float
    joins: bool  # added to the previous step's input (W + f(W) − W) instead of applied to its result

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.change(weight, self.scheme, self.coeff)


@dataclass(frozen=True)
class Edit:
    """How one output tensor is computed from its fp32 base tensor: steps applied in turn."""

    steps: tuple[Step, ...]

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        result = start = base
        for step in self.steps:
            if step.joins:
                result = result + (step(start) - start)
            else:
                start = result
                result = step(start)
        return result

    def groups(self) -> list[tuple[Step, ...]]:
        """The steps split where one applies to the result of the previous (each group starts from one weight)."""
        groups: list[list[Step]] = []
        for step in self.steps:
            if step.joins:
                groups[-1].append(step)
            else:
                groups.append([step])
        return [tuple(group) for group in groups]


@dataclass
class OutputTensor:
    name: str
    source: TensorInfo
    dtype: str
    changes: dict[int, Change] = field(default_factory=dict)  # adapter index → its change to this tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return self.source.nbytes // self.source.torch_dtype.itemsize * DTYPES[self.dtype].itemsize


@dataclass
class MergePlan:
    checkpoint: Checkpoint
    adapters: list[Adapter]
    shards: dict[str, list[OutputTensor]]
    config_patch: dict[str, object] = field(default_factory=dict)

    @property
    def edited(self) -> list[OutputTensor]:
        """Tensors some adapter changes (the union over all adapters)."""
        return [t for tensors in self.shards.values() for t in tensors if t.changes]

    def edit(self, tensor: OutputTensor, composition: Composition) -> Edit | None:
        """The steps that compute `tensor` for this composition; None where no term changes it."""
        steps: list[Step] = []
        for term in composition.terms:
            change = tensor.changes.get(term.adapter)
            if change is None or term.is_noop:
                continue
            previous = steps[-1].change.family if steps else None
            joins = bool(steps) and (
                composition.compose == "sum" or (previous is change.family and change.family.composes_additively)
            )
            steps.append(Step(term.adapter, change, term.scheme, term.coeff, joins))
        return Edit(tuple(steps)) if steps else None


def plan_merge(
    checkpoint: Checkpoint,
    adapters: Adapter | Sequence[Adapter],
    dtype: torch.dtype | None = None,
    options: Mapping[str, object] | None = None,
) -> MergePlan:
    """The output layout and, per tensor, every adapter's change to it (the union over all adapters)."""
    _refuse_quantized(checkpoint)
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    out_code = DTYPE_CODES[dtype] if dtype is not None else None
    if out_code is not None and out_code not in FLOAT_CODES:
        raise BaseModelError(f"--dtype must be a floating type (float32, float16, bfloat16), got {dtype}.")
    plan = MergePlan(checkpoint, adapters, {})
    changes: dict[str, dict[int, Change]] = {}
    head_changes: dict[int, Change] = {}
    head_source = None
    for index, adapter in enumerate(adapters):
        edits = _adapter_changes(checkpoint, adapter, options)
        untie = _untie_head(checkpoint, adapter, edits, plan)
        if untie is not None:
            head_source = untie[0]
            if untie[1] is not None:
                head_changes[index] = untie[1]
        for name, change in edits.items():
            changes.setdefault(name, {})[index] = change
    if head_source is not None:  # untied for one adapter: the others whose change follows onto the head keep it there
        for index, adapter in enumerate(adapters):
            follows = adapter.family.tied_head_follows(adapter.config) and index not in head_changes
            if follows and index in changes.get(head_source, {}):
                head_changes[index] = changes[head_source][index]
    for shard, infos in checkpoint.shard_tensors.items():
        tensors = plan.shards[shard] = []
        for info in infos:
            code = out_code if out_code and info.dtype in FLOAT_CODES else info.dtype
            tensors.append(OutputTensor(info.name, info, code, changes.get(info.name, {})))
            if head_source is not None and info.name == head_source:
                tensors.append(OutputTensor(HEAD, info, code, head_changes))
    if out_code is not None:
        plan.config_patch["torch_dtype" if "torch_dtype" in checkpoint.config else "dtype"] = str(dtype).removeprefix("torch.")
    return plan


def _adapter_changes(checkpoint: Checkpoint, adapter: Adapter, options: Mapping[str, object] | None) -> dict[str, Change]:
    """Tensor name → the change one adapter makes to it."""
    shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
    edits: dict[str, Change] = {}
    states = adapter.modules(ShapeLookup(shapes, names_for(checkpoint), checkpoint.read), options)
    for state in states:
        _add_module_edits(edits, checkpoint, adapter.family, state)
    for name, trained in adapter.replacements().items():
        target = _resolve(checkpoint, name, what=f"replaced tensor {name}")
        base_info = _info(checkpoint, target)
        if base_info.shape != tuple(trained.shape):
            raise AdapterError(
                f"Adapter stores a full copy of {name} with shape {tuple(trained.shape)} but the base tensor {target} "
                f"has shape {base_info.shape}. A resized vocabulary cannot be merged into this base; merge into the "
                "resized base model instead."
            )
        if not torch.equal(trained, checkpoint.read(base_info.name).float()):
            edits[target] = Change(adapter.family, part="replace", trained=trained)
    if not edits:
        raise AdapterError(f"Adapter {adapter.path} targets no module of the base; nothing would change.")
    return edits


def _add_module_edits(edits: dict[str, Change], checkpoint: Checkpoint, family: AdapterFamily, state: ModuleState) -> None:
    if state.layer == "parameter":
        return _add_parameter_edits(edits, names_for(checkpoint), family, state)
    weight_name = _resolve(checkpoint, state.path + ".weight", what=f"adapter module {state.path}")
    weight_shape = _info(checkpoint, weight_name).shape
    if state.layer == "linear" and checkpoint.config.get("model_type") in CONV1D_MODELS:
        # PEFT saves one fan_in_fan_out flag for all modules (the last one it wrapped); the architecture knows.
        state.fan_in_fan_out = state.path.endswith(CONV1D_MODULES)
    if state.fan_in_fan_out:
        weight_shape = weight_shape[::-1]
    bias_name = weight_name.removesuffix("weight") + "bias"
    bias_info = checkpoint.tensors.get(bias_name)
    family.check_shapes(state, weight_shape, bias_info.shape if bias_info else None)
    if weight_name in edits:
        raise AdapterError(f"Two adapter modules change {weight_name}; weightsteer merges one change per tensor.")
    if family.changes_weight(state):
        edits[weight_name] = Change(family, state, "weight")
    if bias_info is not None and family.changes_bias(state):
        edits[bias_name] = Change(family, state, "bias")


def _add_parameter_edits(edits: dict[str, Change], names: CheckpointNames, family: AdapterFamily, state: ModuleState) -> None:
    """A parameter PEFT targets directly (an MoE expert stack): one edit per stored tensor it is made of."""
    module, _, name = state.path.rpartition(".")
    slices = names.slices(state.path)
    _refuse_uncovered(names, state.path, names.parameter(module, name).shape, slices)
    for stored in slices:
        sliced = family.slice_state(state, stored)
        family.check_shapes(sliced, names.shapes[stored.name], None)
        if stored.name in edits:
            raise AdapterError(f"Two adapter modules change {stored.name}; weightsteer merges one change per tensor.")
        edits[stored.name] = Change(family, sliced, "weight")


def _refuse_uncovered(names: CheckpointNames, path: str, shape: tuple[int, ...], slices: list[StoredSlice]) -> None:
    """Every expert (position along the first dim) of a targeted parameter must be stored whole; a merge that
    left part of one as the base would not be what PEFT's forward computes."""
    absent = names.missing_experts(path, shape[0])
    if absent:
        raise AdapterError(
            f"Adapter changes {path} ({shape[0]} experts), but the base checkpoint {names.root} stores no tensors for "
            f"expert{'s' if len(absent) > 1 else ''} {', '.join(absent)}; merging would leave "
            f"{'them' if len(absent) > 1 else 'it'} unchanged. Merge into the complete base checkpoint."
        )
    per_position = math.prod(shape[1:])
    covered = dict.fromkeys(range(shape[0]), 0)
    for stored in slices:
        size = math.prod(1 if isinstance(i, int) else len(i) for i in stored.index[1:])
        for position in stored.experts():
            covered[position] = covered.get(position, 0) + size
    missing = [p for p, n in covered.items() if n != per_position]
    if missing:
        what = "experts" if len(shape) == 3 else "rows"
        raise AdapterError(
            f"Adapter changes {path} ({shape[0]} {what}), but the base checkpoint stores {what} "
            f"{', '.join(map(str, missing))} of it incompletely or not at all (stored: {', '.join(s.name for s in slices[:4])}"
            f"{', …' if len(slices) > 4 else ''}); merging would leave them unchanged. Merge into the complete base."
        )


def _tied_embedding(checkpoint: Checkpoint) -> str | None:
    """The input embedding that doubles as the output head, when the checkpoint stores no head."""
    if HEAD in checkpoint.tensors or names_for(checkpoint).renamed().get(HEAD):  # e.g. Llava's language_model.lm_head
        return None
    embeddings = [n for n in checkpoint.tensors if n.endswith(EMBEDDING_SUFFIXES)]
    return embeddings[0] if len(embeddings) == 1 else None


def _info(checkpoint: Checkpoint, name: str) -> TensorInfo:
    return checkpoint.tensors[_tied_embedding(checkpoint) if name == HEAD and HEAD not in checkpoint.tensors else name]


def _resolve(checkpoint: Checkpoint, name: str, what: str) -> str:
    """The stored tensor for a model-side tensor name: itself, transformers' renaming of a stored name onto it
    (weightsteer.names), the tied head, or the one stored name sharing its suffix."""
    names = names_for(checkpoint)
    stored = names.mapped(name, what)
    if stored is not None:
        return stored
    if name == HEAD and _tied_embedding(checkpoint):
        return name
    return names.resolve(name, what)


def _untie_head(checkpoint: Checkpoint, adapter: Adapter, edits: dict[str, Change], plan: MergePlan) -> tuple[str, Change | None] | None:
    """With tied embeddings, PEFT's forward changes only the side the adapter wraps: untie if needed.

    Returns (embedding tensor, change for the new head tensor) when lm_head.weight must be added.
    """
    embedding = _tied_embedding(checkpoint)
    if embedding is None:
        return None
    head_edit = edits.pop(HEAD, None)
    if embedding not in edits and head_edit is None:
        return None
    if adapter.family.tied_head_follows(adapter.config) and head_edit is None:
        return None  # PEFT applies the embedding's change on both sides: keep one shared tensor.
    plan.config_patch["tie_word_embeddings"] = False
    return embedding, head_edit


def _refuse_quantized(checkpoint: Checkpoint) -> None:
    quantization = checkpoint.config.get("quantization_config")
    quantized = [n for n in checkpoint.tensors if n.endswith(QUANTIZED_SUFFIXES)]
    if quantization or quantized:
        method = (quantization or {}).get("quant_method", "quantized tensors such as " + (quantized or ["?"])[0])
        raise BaseModelError(
            f"The base {checkpoint.root} is quantized ({method}). Adding a change to quantized weights either "
            "loses it or silently re-quantizes the whole tensor; merge into the unquantized base model and "
            "quantize the merged checkpoint afterwards (e.g. to GGUF)."
        )
