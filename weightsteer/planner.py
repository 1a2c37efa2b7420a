"""Decide, from headers alone, which base tensors a merge changes and what the output looks like.

The plan maps every output tensor to its source tensor in the base and, for changed tensors, to the
`Change` each adapter makes to it. One plan serves several outputs (a recipe), each a `Composition` of
terms (adapter, coeff, scheme); `MergePlan.edit` turns a composition into the ordered `Step`s that compute
one tensor. Nothing here reads tensor data, so a bad adapter/base pairing is reported before any output
exists.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .adapters import Adapter
from .adapters.base import AdapterFamily, ModuleState, Scheme, ShapeLookup
from .anatomy import Anatomy, anatomy_of
from .checkpoint import DTYPE_CODES, DTYPES, FLOAT_CODES, Checkpoint, TensorInfo
from .errors import AdapterError, BaseModelError
from .names import CheckpointNames, StoredSlice, names_for

TRAINED_INFIX, ORIGINAL_INFIX = ".modules_to_save.", ".original_module."  # a whole ModulesToSaveWrapper, as PEFT saves it for a resized vocabulary
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
    # For a replacement with more rows than the base (added tokens): the value those rows start from, or None
    # when the adapter does not store one (they then hold the trained rows at every c ≠ 0).
    added_rows_base: torch.Tensor | None = None

    def to(self, device: torch.device, moved: dict[int, torch.Tensor]) -> None:
        """Move the adapter tensors; `moved` (by id) keeps one copy of tensors shared across modules."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(device)
            return moved[id(tensor)]

        if self.trained is not None:
            self.trained = move(self.trained)
        if self.added_rows_base is not None:
            self.added_rows_base = move(self.added_rows_base)
        if self.state is not None:
            self.state.tensors = {name: move(t) for name, t in self.state.tensors.items()}

    def __call__(self, base: torch.Tensor, scheme: Scheme, c: float) -> torch.Tensor:
        if self.part == "replace":
            if not scheme.interpolates_replacements:
                return self.trained
            if self.trained.shape[0] > base.shape[0]:  # added tokens: rows the base lacks
                start = self.trained[base.shape[0] :] if self.added_rows_base is None else self.added_rows_base
                base = torch.cat([base, start])
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
    resized: tuple[int, ...] | None = None  # the output shape, where it differs from the base's (added tokens)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.resized or self.source.shape

    @property
    def nbytes(self) -> int:
        elements = self.source.nbytes // self.source.torch_dtype.itemsize
        if self.resized:
            elements = elements // self.source.shape[0] * self.resized[0]
        return elements * DTYPES[self.dtype].itemsize


@dataclass
class NewTensor:
    """An output tensor the base does not store: a bias a change adds where the base module has none (a steering
    vector's), written right after the module's weight. It is a change to an all-zero base bias, so an output
    whose terms leave it alone writes zeros."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    changes: dict[int, Change] = field(default_factory=dict)  # adapter index → its change to this tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass
class MergePlan:
    checkpoint: Checkpoint
    adapters: list[Adapter]
    shards: dict[str, list[OutputTensor | NewTensor]]
    config_patch: dict[str, object] = field(default_factory=dict)  # "a.b" keys patch nested objects (text_config)
    # The module path of an output head that shares the edited input embedding's tensor (it changes with it).
    shared_head: str | None = None

    @property
    def edited(self) -> list[OutputTensor]:
        """Base tensors some adapter changes (the union over all adapters)."""
        return [t for tensors in self.shards.values() for t in tensors if isinstance(t, OutputTensor) and t.changes]

    @property
    def added(self) -> list[NewTensor]:
        """Tensors the base lacks (new biases)."""
        return [t for tensors in self.shards.values() for t in tensors if isinstance(t, NewTensor)]

    def at_base(self) -> "MergePlan":
        """The plan of an output whose every term is a no-op (coeff 0): the base's own layout and config (only a
        --dtype cast remains), so no untied head, no grown vocabulary."""
        shards = {
            shard: [
                OutputTensor(t.name, t.source, t.dtype) for t in tensors if isinstance(t, OutputTensor) and t.name == t.source.name
            ]
            for shard, tensors in self.shards.items()
        }
        patch = {k: v for k, v in self.config_patch.items() if k in ("dtype", "torch_dtype")}
        return MergePlan(self.checkpoint, self.adapters, shards, patch)

    def edit(self, tensor: OutputTensor | NewTensor, composition: Composition) -> Edit | None:
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
    resized: dict[str, tuple[int, ...]] = {}
    added: dict[str, dict[str, dict[int, Change | None]]] = {}  # stored tensor → {tied member written apart: changes}
    for index, adapter in enumerate(adapters):
        edits, grown = _adapter_changes(checkpoint, adapter, options)
        resized.update(grown)
        for stored, members in _tied_outputs(checkpoint, adapter, edits, plan).items():
            for member, change in members:
                added.setdefault(stored, {}).setdefault(member, {})[index] = change
        for name, change in edits.items():
            changes.setdefault(name, {})[index] = change
    for stored, members in added.items():  # an adapter that keeps a member shared changes it as the stored tensor
        for by_adapter in members.values():
            for index, change in changes.get(stored, {}).items():
                by_adapter.setdefault(index, change)
    for shard, infos in checkpoint.shard_tensors.items():
        tensors = plan.shards[shard] = []
        for info in infos:
            code = out_code if out_code and info.dtype in FLOAT_CODES else info.dtype
            tensors.append(OutputTensor(info.name, info, code, changes.get(info.name, {}), resized.get(info.name)))
            for member, by_adapter in added.get(info.name, {}).items():
                kept = {i: c for i, c in by_adapter.items() if c is not None}
                tensors.append(OutputTensor(member, info, code, kept, resized.get(member)))
            new_bias = _added_bias(checkpoint, info, code, changes)
            if new_bias is not None:
                tensors.append(new_bias)
    if resized:
        plan.config_patch.update(_config_keys(checkpoint.config, "vocab_size", _check_resized(plan, resized)))
    for adapter in adapters:
        plan.config_patch.update(adapter.config_patch(checkpoint.config))
    if out_code is not None:
        plan.config_patch["torch_dtype" if "torch_dtype" in checkpoint.config else "dtype"] = str(dtype).removeprefix("torch.")
    return plan


def _adapter_changes(
    checkpoint: Checkpoint, adapter: Adapter, options: Mapping[str, object] | None
) -> tuple[dict[str, Change], dict[str, tuple[int, ...]]]:
    """Tensor name → the change one adapter makes to it; and {tensor: new shape} where it adds token rows."""
    shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
    edits: dict[str, Change] = {}
    states = adapter.modules(ShapeLookup(shapes, names_for(checkpoint), checkpoint.config, checkpoint.read), options)
    for state in states:
        _add_module_edits(edits, checkpoint, adapter.family, state)
    resized = _add_replacements(edits, checkpoint, adapter)
    if not edits:
        raise AdapterError(f"Adapter {adapter.path} targets no module of the base; nothing would change.")
    return edits, resized


def _add_module_edits(edits: dict[str, Change], checkpoint: Checkpoint, family: AdapterFamily, state: ModuleState) -> None:
    if state.layer == "parameter":
        return _add_parameter_edits(edits, names_for(checkpoint), family, state)
    weight_name = _resolve(checkpoint, state.path + ".weight", what=f"adapter module {state.path}")
    weight_shape = _info(checkpoint, weight_name).shape
    if state.layer == "linear":
        # PEFT decides per layer type: Conv1D forces fan_in_fan_out=True, nn.Linear warns and resets it to False
        # (peft/tuners/lora/layer.py dispatch_default); the saved flag is the last wrapped layer's. The
        # architecture says which layers are Conv1D.
        conv1d_model = checkpoint.config.get("model_type") in CONV1D_MODELS
        state.fan_in_fan_out = conv1d_model and state.path.endswith(CONV1D_MODULES)
    if state.fan_in_fan_out:
        weight_shape = weight_shape[::-1]
    bias_name = weight_name.removesuffix("weight") + "bias"
    bias_info = checkpoint.tensors.get(bias_name)
    family.check_shapes(state, weight_shape, bias_info.shape if bias_info else None)
    if weight_name in edits:
        raise AdapterError(f"Two adapter modules change {weight_name}; weightsteer merges one change per tensor.")
    if family.changes_weight(state):
        edits[weight_name] = Change(family, state, "weight")
    if family.changes_bias(state) and (bias_info is not None or family.adds_bias(state)):
        edits[bias_name] = Change(family, state, "bias")  # a bias the base lacks becomes a NewTensor


def _added_bias(checkpoint: Checkpoint, weight: TensorInfo, code: str, changes: dict[str, dict[int, Change]]) -> NewTensor | None:
    """The bias changes add to `weight`'s module where the base stores none; the adapters' config_patch makes the
    architecture declare it (e.g. Llama's mlp_bias)."""
    name = weight.name.removesuffix("weight") + "bias"
    if not weight.name.endswith("weight") or name in checkpoint.tensors or name not in changes:
        return None
    state = next(iter(changes[name].values())).state
    rows = weight.shape[-1] if state.fan_in_fan_out else weight.shape[0]
    return NewTensor(name, (rows,), code, changes[name])


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


def _add_replacements(edits: dict[str, Change], checkpoint: Checkpoint, adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """Edits for the tensors the adapter stores whole; returns {tensor: new shape} for those with added token rows.

    For a resized vocabulary PEFT saves the whole wrapper: `<m>.modules_to_save.weight` (trained, also saved as
    `<m>.weight`) and `<m>.original_module.weight` (the resized base, whose added rows start from their init).
    """
    replacements = adapter.replacements()
    originals = {n.replace(ORIGINAL_INFIX, "."): t for n, t in replacements.items() if ORIGINAL_INFIX in n}
    resized = {}
    for name, trained in replacements.items():
        if ORIGINAL_INFIX in name or (TRAINED_INFIX in name and name.replace(TRAINED_INFIX, ".") in replacements):
            continue
        name = name.replace(TRAINED_INFIX, ".")
        target = _resolve(checkpoint, name, what=f"replaced tensor {name}")
        base_info = _info(checkpoint, target)
        if _adds_rows(base_info.shape, tuple(trained.shape)):
            resized[target] = tuple(trained.shape)
            original = originals.get(name)
            start = original[base_info.shape[0] :] if original is not None and original.shape == trained.shape else None
            edits[target] = Change(adapter.family, part="replace", trained=trained, added_rows_base=start)
        elif base_info.shape != tuple(trained.shape):
            raise AdapterError(
                f"Adapter stores a full copy of {name} with shape {tuple(trained.shape)} but the base tensor {target} "
                f"has shape {base_info.shape}; only a vocabulary grown by added tokens can be merged. Is --base the "
                "model this adapter was trained on?"
            )
        elif not torch.equal(trained, checkpoint.read(base_info.name).float()):
            edits[target] = Change(adapter.family, part="replace", trained=trained)
    return resized


def _check_resized(plan: MergePlan, resized: dict[str, tuple[int, ...]]) -> int:
    """The new vocabulary size; refused unless every embedding and head of the output has it."""
    layout = tying(plan.checkpoint)
    vocab = max(shape[0] for shape in resized.values())
    a = layout.anatomy
    vocabulary = {layout.key(a.input_embedding), layout.key(a.output_embedding)} if a else set(resized)
    stale = [t.name for tensors in plan.shards.values() for t in tensors if t.name in vocabulary and t.shape[0] != vocab]
    if stale or any(shape[0] != vocab for shape in resized.values()):
        raise AdapterError(
            f"The adapter stores {', '.join(resized)} with a vocabulary of {vocab} tokens, but not "
            f"{', '.join(stale) or 'every embedding'}, which keeps the base's {plan.checkpoint.tensors[next(iter(resized))].shape[0]}: "
            "the rows of the added tokens are missing. Merge into the resized base model instead (--base)."
        )
    return vocab


def _adds_rows(base: tuple[int, ...], trained: tuple[int, ...]) -> bool:
    """Is `trained` the base embedding / head with rows added at the end (a resized vocabulary)?"""
    return len(base) == 2 == len(trained) and base[1] == trained[1] and trained[0] > base[0]


def _info(checkpoint: Checkpoint, name: str) -> TensorInfo:
    """The stored tensor behind an output tensor name (a tied member the checkpoint does not store reads its source)."""
    return checkpoint.tensors[name] if name in checkpoint.tensors else checkpoint.tensors[tying(checkpoint).unstored[name]]


def _resolve(checkpoint: Checkpoint, name: str, what: str) -> str:
    """The stored tensor for a model-side tensor name: itself, transformers' renaming of a stored name onto it
    (weightsteer.names), a tied parameter the checkpoint does not store (planned under its own name, see Tying),
    or the one stored name sharing its suffix."""
    names = names_for(checkpoint)
    stored = names.mapped(name, what)
    if stored is not None:
        return stored
    if name in tying(checkpoint).unstored:
        return name
    return names.resolve(name, what)


class Tying:
    """A checkpoint's input embedding, output head and tied weights, from transformers (weightsteer.anatomy).

    Built on first use: transformers is imported only for merges that touch a tied tensor or a name the
    checkpoint does not store as is.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    @functools.cached_property
    def anatomy(self) -> Anatomy | None:
        model = names_for(self.checkpoint).model()
        return anatomy_of(model) if model is not None else None

    def disk(self, name: str) -> str:
        """The checkpoint's name for a model-name-space parameter (weightsteer.names), or the name itself."""
        try:
            return names_for(self.checkpoint).mapped(name, name) or name
        except AdapterError:  # fused or ambiguous: not one stored tensor
            return name

    def key(self, name: str | None) -> str | None:
        """How a model parameter is named in a plan: its checkpoint name, or its own if the checkpoint does not store it."""
        return None if name is None else (self.disk(name) if self.disk(name) in self.checkpoint.tensors else name)

    @functools.cached_property
    def unstored(self) -> dict[str, str]:
        """Tied parameters the checkpoint does not store → the stored tensor they load from (as transformers ties
        them: target ← source, or source ← target when only the target is stored)."""
        found = {}
        for target, source in (self.anatomy.tied if self.anatomy else {}).items():
            stored = [n for n in (source, target) if self.disk(n) in self.checkpoint.tensors]
            for name in (source, target):
                if stored and self.disk(name) not in self.checkpoint.tensors:
                    found[name] = self.disk(stored[0])
        return found

    def may_be_tied(self, name: str) -> bool:
        """Could this stored tensor share storage with another parameter? (Vocabulary-sized matrices only, so that
        other merges need not import transformers.)"""
        shape = self.checkpoint.tensors[name].shape
        vocab = {self.checkpoint.config.get("vocab_size"), (self.checkpoint.config.get("text_config") or {}).get("vocab_size")}
        return len(shape) == 2 and (shape[0] in vocab or vocab == {None})

    def is_embedding(self, key: str) -> bool:
        """Is this plan tensor an embedding lookup (vocab × dim: the input embedding or a tied copy, not the head)?"""
        a = self.anatomy
        if a is None or a.input_embedding is None:
            return False
        lookups = {self.key(m) for m in a.group(a.input_embedding) or [a.input_embedding]} - {self.key(a.output_embedding)}
        return key in lookups

    def tie_flag_patch(self) -> dict[str, object]:
        """`tie_word_embeddings: false` where transformers reads it: the top level (if this config class honours the
        flag; T5's forces it and reads it as a scaling switch) and `text_config` (read by transformers 4.x VLMs)."""
        config = self.checkpoint.config
        patch: dict[str, object] = {}
        if self.anatomy is not None and self.anatomy.reads_tie_flag:
            patch["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            patch["text_config.tie_word_embeddings"] = False
        return patch


_TYINGS: "weakref.WeakKeyDictionary[Checkpoint, Tying]" = weakref.WeakKeyDictionary()


def tying(checkpoint: Checkpoint) -> Tying:
    if checkpoint not in _TYINGS:
        _TYINGS[checkpoint] = Tying(checkpoint)
    return _TYINGS[checkpoint]


def _tied_outputs(checkpoint: Checkpoint, adapter: Adapter, edits: dict[str, Change], plan: MergePlan) -> dict[str, list[tuple[str, Change | None]]]:
    """Tied tensors that PEFT's forward changes differently get tensors of their own; the rest stay shared.

    PEFT changes only the modules it wraps: a LoRA on the tied embedding leaves the head as the base, so the
    checkpoint is untied (the head written as the base had it). Where PEFT ties the head's adapter to the
    embedding's (ensure_weight_tying, trainable tokens), both read one change, applied once to the shared tensor.
    Returns {stored tensor: [(new tensor name, its edit or None for the base value)]}, written after it.
    """
    layout = tying(checkpoint)
    touched = [name for name in edits if name not in checkpoint.tensors or layout.may_be_tied(name)]
    if not touched or layout.anatomy is None:
        return {}
    a = layout.anatomy
    embedding, head = layout.key(a.input_embedding), layout.key(a.output_embedding)
    added: dict[str, list[tuple[str, Change | None]]] = {}
    for stored in dict.fromkeys(layout.unstored.get(name, name) for name in touched):
        members = [stored, *(name for name, source in layout.unstored.items() if source == stored)]
        if len(members) == 1:
            continue
        _refuse_unused_source(a, layout, members, edits)
        values = {m: edits.pop(m, None) if m != stored else edits.get(m) for m in members}
        if head in values and embedding in values and _head_reads_embedding(adapter, values[head]):
            values[head] = values[embedding]  # PEFT's tied head adapter reads the embedding's change (its saved copy is a view)
        values = {m: values[stored] if _same_replacement(value, values[stored]) else value for m, value in values.items()}
        if values[stored] is None:
            edits.pop(stored, None)
        separate = [(m, values[m]) for m in members[1:] if values[m] is not values[stored]]
        if head in dict(separate) and layout.tie_flag_patch():
            # Untying by the flag unties every member (BART's encoder/decoder embed_tokens too): store them all.
            separate = [(m, values[m]) for m in members[1:]]
            plan.config_patch.update(layout.tie_flag_patch())
        if separate:
            added[stored] = separate
        elif head in values and head != stored and values[head] is not None:
            plan.shared_head = (a.output_embedding or "").removesuffix(".weight")
    if _stored_twice_and_diverging(layout, edits):
        plan.config_patch.update(layout.tie_flag_patch())
    return added


def _stored_twice_and_diverging(layout: Tying, edits: dict[str, Change]) -> bool:
    """A checkpoint that stores both sides of a tie (equal, so transformers ties them) whose sides now differ:
    the flag must say untied, or runtimes that tie by the config alone read one side for both."""
    stored = layout.checkpoint.tensors
    for target, source in layout.anatomy.tied.items():
        sides = [layout.disk(target), layout.disk(source)]
        if all(n in stored for n in sides):
            first, second = (edits.get(n) for n in sides)
            if first is not second and not _same_replacement(first, second):
                return True
    return False


def _same_replacement(a: Change | None, b: Change | None) -> bool:
    """Two whole copies of one tied tensor with equal values (PEFT saves a tied module_to_save under both names)."""
    return a is not None and b is not None and a.part == b.part == "replace" and torch.equal(a.trained, b.trained)


def _head_reads_embedding(adapter: Adapter, head_edit: Change | None) -> bool:
    """Does PEFT tie the head's adapter to the embedding's? Then the head's own saved tensors (if any) are a copy."""
    follows = adapter.family.tied_head_follows(adapter.config)
    return follows and (head_edit is None or bool(adapter.config.get("ensure_weight_tying")))


def _refuse_unused_source(a: Anatomy, layout: Tying, members: list[str], edits: dict[str, Change]) -> None:
    """T5 / BART keep `shared` as the source of the encoder's, decoder's (and head's) tied embeddings, but their
    forward looks tokens up through encoder/decoder.embed_tokens: PEFT's forward never calls a wrapped `shared`."""
    for source in set(a.tied.values()):
        lookups = [t for t, s in a.tied.items() if s == source and t != a.output_embedding]
        key = layout.key(source)
        if lookups and key in members and edits.get(key) is not None:
            module = source.removesuffix(".weight")
            raise AdapterError(
                f"The adapter changes {module}, which this {a.model_class} never calls: its forward looks tokens up "
                f"through {', '.join(t.removesuffix('.weight') for t in lookups)}, so PEFT's forward ignores the change "
                f"(and a merge would change those too). Target those modules instead (e.g. target_modules=[\"embed_tokens\"])."
            )


def _config_keys(config: dict, key: str, value: object) -> dict[str, object]:
    """Patch `key` at the top level and in `text_config`, where the config has it (the top level otherwise)."""
    patch = {f"text_config.{key}": value} if key in (config.get("text_config") or {}) else {}
    if key in config or not patch:
        patch[key] = value
    return patch


def _refuse_quantized(checkpoint: Checkpoint) -> None:
    quantization = checkpoint.config.get("quantization_config")
    quantized = [n for n in checkpoint.tensors if n.endswith(QUANTIZED_SUFFIXES)]
    if quantization or quantized:
        settings = quantization if isinstance(quantization, dict) else {}
        method = settings.get("quant_method", "quantized tensors such as " + (quantized or ["?"])[0])
        raise BaseModelError(
            f"The base {checkpoint.root} is quantized ({method}). Adding a change to quantized weights either "
            "loses it or silently re-quantizes the whole tensor; merge into the unquantized base model and "
            "quantize the merged checkpoint afterwards (e.g. to GGUF)."
        )
