"""Model-side tensor names (as PEFT saves adapter paths) ↔ tensor names as the checkpoint stores them.

transformers 5 loads a checkpoint by renaming each stored key through the model class's conversion mapping
(transformers/conversion_mapping.py get_model_conversion_mapping, applied key by key in
core_model_loading.convert_and_load_state_dict_in_model), and some `WeightConverter`s fuse several stored
tensors into one parameter (MoE experts: per-expert `w1`/`w3` → `experts.gate_up_proj`). `CheckpointNames`
replays that renaming on the checkpoint's own key list, on a meta-device model built from config.json (no
weight is read), so a model-side name finds the stored tensor, or the slices of the stored tensors that a fused
parameter is made of. Output names stay the stored ones: this only tells which stored tensor a change goes to.
"""

from __future__ import annotations

import logging
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .errors import AdapterError

Index = int | torch.Tensor  # a fixed position along a parameter dim, or the positions a stored dim covers


@dataclass(frozen=True)
class StoredSlice:
    """Where one stored tensor sits in a model parameter: stored[i₀, i₁, …] = param[index] with, for each
    parameter dim f, index[f] fixed or index[f][i_k] for the stored dim k that runs along f (`dims[k] = f`)."""

    name: str
    index: tuple[Index, ...]
    dims: tuple[int, ...]

    def experts(self) -> list[int]:
        """The positions along the parameter's first dim (its experts, for a 3-D expert stack)."""
        first = self.index[0]
        return [first] if isinstance(first, int) else first.tolist()


@dataclass(frozen=True)
class ModelParameter:
    """A parameter of the meta-device model: its shape and whether its module stores experts as
    (experts, in, out) (transformers' `is_transposed`, read by PEFT's ParamWrapper)."""

    name: str
    shape: tuple[int, ...]
    transposed: bool


class CheckpointNames:
    """Name lookups for one checkpoint: its stored names, and the model built from its config.json."""

    def __init__(self, root: Path, config: Mapping, shapes: Mapping[str, tuple[int, ...]]):
        self.root, self.config, self.shapes = Path(root), config, shapes
        self._model: torch.nn.Module | None = None
        self._model_error: str | None = None
        self._renamed: dict[str, list[str]] | None = None  # model name → stored names renamed 1:1 onto it
        self._fused: dict[str, tuple[object, dict[str, list[str]]]] | None = None  # model name → (converter, sources)

    # ---- one stored tensor per model name ---------------------------------------------------------
    def mapped(self, name: str, what: str) -> str | None:
        """The stored tensor holding a model-side tensor whole: the name itself, or the one stored name that
        transformers' checkpoint conversion renames onto it; None if neither exists."""
        if name in self.shapes:
            return name
        renamed = self.renamed().get(name, [])
        if len(renamed) > 1:
            raise self._ambiguous(name, what, renamed)
        if name in self.fused():
            stored = [n for names in self.fused()[name][1].values() for n in names]
            raise AdapterError(
                f"{what}: {self._model_label()} builds {name!r} from {len(stored)} stored tensors ({stored[0]!r}, …); "
                "only a LoRA with target_parameters on that fused parameter can change it."
            )
        return renamed[0] if renamed else None

    def resolve(self, name: str, what: str) -> str:
        """`mapped`, or for checkpoints transformers cannot map, the one stored name sharing its suffix."""
        mapped = self.mapped(name, what)
        if mapped is not None:
            return mapped
        candidates = [n for n in self.shapes if name.endswith("." + n) or n.endswith("." + name)]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise self._ambiguous(name, what, candidates)
        raise AdapterError(f"{what}: the base checkpoint {self.root} has no tensor {name!r}{self._hint(name)}")

    def find(self, name: str) -> str | None:
        """Like `resolve`, None where it would raise."""
        try:
            return self.resolve(name, name)
        except AdapterError:
            return None

    def _ambiguous(self, name: str, what: str, stored: list[str]) -> AdapterError:
        return AdapterError(
            f"{what}: the model name {name!r} matches several stored tensors of {self.root}: "
            f"{', '.join(map(repr, stored))} (model names as {self._model_label()} calls them; stored names as the "
            "checkpoint files have them). Merge into a checkpoint with one copy of that tensor."
        )

    def _hint(self, name: str) -> str:
        import difflib

        close = difflib.get_close_matches(name, list(self.shapes), n=1)
        mapped = (
            f" (nor does {self._model_label()}'s checkpoint conversion map a stored tensor onto it)"
            if self.model() is not None
            else f" ({self._model_error})"
        )
        hint = f" The closest stored tensor is {close[0]!r}." if close else ""
        return f"{mapped}.{hint} Is --base the model this adapter was trained on?"

    def _model_label(self) -> str:
        return type(self._model).__name__ if self._model is not None else "transformers"

    # ---- fused parameters ---------------------------------------------------------------------------
    def slices(self, name: str) -> list[StoredSlice]:
        """The stored tensors a model parameter is made of, each with its place in the parameter.

        A parameter stored whole (under its own or a renamed name) is one slice covering it; a parameter that
        transformers fuses from several stored tensors gets one slice per stored tensor, found by replaying the
        converter's operations on index positions rather than on data."""
        if name in self.fused():
            converter, sources = self.fused()[name]
            return _fused_slices(name, converter, sources, self.shapes)
        stored = self.resolve(name, f"parameter {name}")
        return _stored(stored, self.shapes[stored]).pieces

    def missing_experts(self, name: str, count: int) -> list[str]:
        """Experts 0…count−1 that a fused parameter's stored tensors lack, by the number the converter's `*`
        stands for in their names (e.g. …experts.*.w1.weight)."""
        if name not in self.fused():
            return []
        missing: set[str] = set()
        for pattern, stored in self.fused()[name][1].items():
            if "*" not in pattern:
                continue
            number = re.compile(r"\.".join(re.escape(part).replace(r"\*", r"(\d+)") for part in pattern.split(".")) + "$")
            found = {m[1] for n in stored if (m := number.search(n))}
            missing |= {str(i) for i in range(count)} - found
        return sorted(missing, key=int)

    def parameter(self, module: str, name: str) -> ModelParameter:
        """A parameter of the model at a module path, as transformers defines it (for target_parameters)."""
        return self.parameters(module)[name]

    def parameters(self, module: str) -> dict[str, ModelParameter]:
        """The module's own parameters in definition order (the order PEFT nests ParamWrappers in)."""
        model = self.model()
        if model is None:
            raise AdapterError(
                f"Adapter targets parameters of {module} (target_parameters), which needs the model's layout from "
                f"transformers, but {self._model_error}. Upgrade transformers to a version that knows this model."
            )
        try:
            owner = model.get_submodule(module)
        except AttributeError as e:
            raise AdapterError(f"The model {self._model_label()} has no module {module!r}; is --base the model the "
                               "adapter was trained on?") from e
        transposed = bool(getattr(owner, "is_transposed", False))
        return {
            n: ModelParameter(n, tuple(p.shape), transposed) for n, p in owner.named_parameters(recurse=False)
        }

    # ---- transformers' renaming, replayed on the stored names --------------------------------------
    def renamed(self) -> dict[str, list[str]]:
        if self._renamed is None:
            self._replay()
        return self._renamed

    def fused(self) -> dict[str, tuple[object, dict[str, list[str]]]]:
        if self._fused is None:
            self._replay()
        return self._fused

    def _replay(self) -> None:
        """Rename every stored key as transformers' loader does (core_model_loading.py,
        convert_and_load_state_dict_in_model, steps 1–2): all renamings, then at most one converter, in
        dot_natural_key order, keeping the stored name where the renamed one is no model parameter."""
        self._renamed, self._fused = {}, {}
        model = self.model()
        if model is None:
            return
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        params = model.state_dict()
        prefix = model.base_model_prefix
        for stored in sorted(self.shapes, key=dot_natural_key):
            name, pattern = rename_source_key(stored, renamings, converters, prefix, params)
            if name not in params and stored in params:
                name, pattern = rename_source_key(stored, [], [], prefix, params)
            if name not in params:
                continue
            if pattern is None:
                self._renamed.setdefault(name, []).append(stored)
            else:
                converter, sources = self._fused.setdefault(name, (by_pattern[pattern], {}))
                sources.setdefault(pattern, []).append(stored)

    def model(self) -> torch.nn.Module | None:
        """The model class named by config.json `architectures`, built on the meta device (no weights)."""
        if self._model is None and self._model_error is None:
            self._model, self._model_error = _meta_model(self.root, self.config)
        return self._model


def _meta_model(root: Path, config: Mapping) -> tuple[torch.nn.Module | None, str | None]:
    import transformers

    architectures = config.get("architectures") or []
    if not architectures:
        return None, "its config.json names no architectures"
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        return None, f"transformers {transformers.__version__} has no class {architectures[0]}"
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model_config = transformers.AutoConfig.from_pretrained(root)
            return cls(model_config), None
    except Exception as e:  # a config this transformers cannot build: fall back to stored names alone
        return None, f"transformers could not build {architectures[0]} from its config.json ({type(e).__name__}: {e})"
    finally:
        quiet.setLevel(level)


# ---- converter operations, replayed on positions ----------------------------------------------------


@dataclass
class _Symbolic:
    """A tensor as a converter builds it, tracked by where each stored tensor's elements land."""

    shape: tuple[int, ...]
    pieces: list[StoredSlice]


def _fused_slices(name: str, converter, sources: dict[str, list[str]], shapes) -> list[StoredSlice]:
    """Run the converter's operations (MergeModulelist, Concatenate, Transpose, Interleave) on positions."""
    from transformers.core_model_loading import Concatenate, Interleave, MergeModulelist, Transpose

    values: dict[str, object] = {
        pattern: [_stored(n, shapes[n]) for n in names] for pattern, names in sources.items()
    }
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            values = {p: _stack(v, op.dim) for p, v in values.items()}
        elif isinstance(op, Concatenate):
            values = {name: _cat([_single(values[p]) for p in converter.source_patterns if p in values], op.dim)}
        elif isinstance(op, Transpose) and not op.check_dims:
            values = {p: _transpose(_single(v), op.dim0, op.dim1) for p, v in values.items()}
        elif isinstance(op, Interleave):
            values = {p: _interleave(_single(v), op) for p, v in values.items()}
        else:
            first = next(iter(sources.values()))[0]
            raise AdapterError(
                f"transformers builds {name} from stored tensors such as {first!r} with {op!r}, which weightsteer "
                "cannot trace back to the stored tensors yet; please open an issue."
            )
    (result,) = values.values()
    return _single(result).pieces


def _single(value) -> _Symbolic:
    return value[0] if isinstance(value, list) else value


def _stored(name: str, shape: tuple[int, ...]) -> _Symbolic:
    return _Symbolic(tuple(shape), [StoredSlice(name, tuple(torch.arange(n) for n in shape), tuple(range(len(shape))))])


def _stack(tensors: list[_Symbolic], dim: int) -> _Symbolic:
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise AdapterError(f"Stored tensors {[t.pieces[0].name for t in tensors][:4]} … differ in shape {shapes}.")
    pieces = []
    for position, tensor in enumerate(tensors):
        for piece in tensor.pieces:
            index = piece.index[:dim] + (position,) + piece.index[dim:]
            pieces.append(StoredSlice(piece.name, index, tuple(d + (d >= dim) for d in piece.dims)))
    shape = tensors[0].shape
    return _Symbolic(shape[:dim] + (len(tensors),) + shape[dim:], pieces)


def _cat(tensors: list[_Symbolic], dim: int) -> _Symbolic:
    pieces, offset = [], 0
    for tensor in tensors:
        for piece in tensor.pieces:
            index = list(piece.index)
            index[dim] = index[dim] + offset
            pieces.append(StoredSlice(piece.name, tuple(index), piece.dims))
        offset += tensor.shape[dim]
    shape = list(tensors[0].shape)
    shape[dim] = offset
    return _Symbolic(tuple(shape), pieces)


def _transpose(tensor: _Symbolic, d0: int, d1: int) -> _Symbolic:
    swap = {d0: d1, d1: d0}
    pieces = []
    for piece in tensor.pieces:
        index = list(piece.index)
        index[d0], index[d1] = index[d1], index[d0]
        pieces.append(StoredSlice(piece.name, tuple(index), tuple(swap.get(d, d) for d in piece.dims)))
    shape = list(tensor.shape)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    return _Symbolic(tuple(shape), pieces)


def _interleave(tensor: _Symbolic, op) -> _Symbolic:
    """Interleave permutes one dim; running the op itself on positions gives the permutation."""
    dim, n = op.dim, tensor.shape[op.dim]
    probe = torch.arange(n).reshape([n if d == dim else 1 for d in range(len(tensor.shape))])
    moved = op.convert({"x": probe}, ["x"], ["x"])["x"].reshape(-1)  # moved[new] = old
    new_of_old = torch.empty_like(moved)
    new_of_old[moved] = torch.arange(n)
    pieces = []
    for piece in tensor.pieces:
        index = list(piece.index)
        old = index[dim]
        index[dim] = int(new_of_old[old]) if isinstance(old, int) else new_of_old[old]
        pieces.append(StoredSlice(piece.name, tuple(index), piece.dims))
    return _Symbolic(tensor.shape, pieces)


_CACHE: "weakref.WeakKeyDictionary[object, CheckpointNames]" = weakref.WeakKeyDictionary()


def names_for(checkpoint) -> CheckpointNames:
    """The (cached) name lookups for a weightsteer Checkpoint."""
    if checkpoint not in _CACHE:
        shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
        _CACHE[checkpoint] = CheckpointNames(checkpoint.root, checkpoint.config, shapes)
    return _CACHE[checkpoint]
