"""Export an adapter at a coeff as a plain PEFT LoRA, for runtimes that steer with LoRAs (vLLM, llama.cpp).

The written folder is an ordinary LoRA: per module only lora_A (r × in) and lora_B (out × r), peft_type LORA,
lora_alpha = r (scale 1: each module's own scale is folded into B), one rank for every module (shorter
factorisations are padded with zeros, so runtimes with a single alpha read the same scale everywhere).
Embedding modules are written as PEFT writes them (lora_embedding_A/B), changed biases as lora_B.bias
(lora_bias = true).

Per module the change ΔW = weight(state at c, W) − W is factored
  exactly, without an SVD, where ΔW is a product of small factors: the family's `low_rank(state, shape)`
  (LoRA, rsLoRA, DeLoRA, VeRA, AdaLoRA, LoHa); or
  by a truncated SVD of ΔW computed from the base tensor (read one at a time), with the relative error
  ‖ΔW − BA‖_F / ‖ΔW‖_F reported (IA3, RoAd, OFT, BOFT, HRA, DoRA — its magnitude included —, FourierFT,
  trainable tokens, VB-LoRA, RandLoRA, ...).
`rank` caps every module's rank (exact ones too, by an SVD of their small factors); `energy` keeps, per
module, the smallest rank whose singular values hold that share of ‖ΔW‖². Without either, exact factors are
kept whole, and an SVD module keeps its numerical rank when that is at most DEFAULT_MAX_RANK (exact to fp32:
e.g. trainable-token rows, a low-rank modules_to_save change), else DEFAULT_ENERGY.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .adapters import Adapter
from .adapters.base import MODEL_PREFIX, AdapterFamily, ModuleState, Scheme
from .checkpoint import Checkpoint
from .errors import ExportError
from .outputs import check_output, publish, remove_quietly, staging_dir
from .merge import finite_coeff, open_plan
from .planner import EMBEDDING_SUFFIXES, HEAD, OutputTensor, _resolve, _tied_embedding

PathLike = str | os.PathLike
DEFAULT_ENERGY = 0.99
DEFAULT_MAX_RANK = 64
NUMERICAL_RANK_RTOL = 1e-5  # singular values below σ₁·rtol are fp32 noise of W' − W
REPORT_NAME = "weightsteer-lora.json"
Factors = tuple[torch.Tensor, torch.Tensor]  # (B: out × r, A: r × in), ΔW = B @ A


@dataclass
class ModuleExport:
    """How one module's change was written."""

    module: str
    method: str  # "exact" (the adapter's own factors) or "svd" (truncated SVD of ΔW)
    rank: int  # rank kept before padding
    relative_error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F (0 for exact factors kept whole)
    layer: str = "linear"  # or "embedding"


@dataclass
class LoraExport:
    """One exported LoRA folder."""

    path: Path
    coeff: float
    scheme: str
    adapter_type: str
    rank: int
    base: Path | None = None  # the base folder used (local, or the Hub cache's snapshot)
    modules: list[ModuleExport] = field(default_factory=list)
    linear_in_coeff: bool = False  # ΔW(c) = c·ΔW(1): a runtime LoRA scale acts as coeff
    warnings: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    def summary(self) -> str:
        exact = sum(m.method == "exact" for m in self.modules)
        text = (
            f"wrote {self.path}  ({self.adapter_type} at coeff {self.coeff:g} as a LoRA of rank {self.rank} on "
            f"{len(self.modules)} modules: {exact} exact, {len(self.modules) - exact} truncated SVD; max relative "
            f"error {self.max_relative_error:.2e})"
        )
        if self.linear_in_coeff:
            text += f"\n  runtime scale s applies coeff {self.coeff:g}·s (llama.cpp: --lora-scaled FILE:s, s may be negative)"
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["base"] = str(self.base) if self.base else None
        data["max_relative_error"] = self.max_relative_error
        return data


def export_lora(
    adapter: PathLike,
    output: PathLike,
    *,
    coeff: float = 1.0,
    base: PathLike | None = None,
    scheme: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    task_id: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> LoraExport:
    """Write `adapter` at strength `coeff` as a plain PEFT LoRA folder at `output` (see the module docstring).

    `base` (folder or Hub id; default: the adapter's base_model_name_or_path) gives the tensor shapes, and the
    base weights for modules that need an SVD. Returns what was written, with per-module errors.
    """
    coeff = finite_coeff(coeff)
    _check_truncation(rank, energy)
    output = Path(output)
    check_output(output, overwrite)
    plan, base_ref, _ = open_plan(adapter, base=base, scheme=scheme, task_id=task_id)
    loaded, checkpoint, chosen = plan.adapter, plan.checkpoint, plan.scheme
    if plan.added or (plan.edited and all(t.edit.part == "bias" for t in plan.edited)):
        raise ExportError(f"{adapter} is an activation steering vector (a bias), not a weight change; use `weightsteer export-vector`.")
    result = LoraExport(output, coeff, chosen.name, loaded.peft_type, 0, checkpoint.root)
    modules = _module_changes(plan.edited, checkpoint, loaded, chosen, coeff, rank, energy, result, progress)
    _add_tied_head(modules, checkpoint, plan.config_patch, plan.edited)
    result.rank = max((m["factors"][0].shape[1] for m in modules.values() if "factors" in m), default=1)
    result.modules = [m["report"] for m in modules.values() if "report" in m]
    staging = staging_dir(output)
    try:
        _write(staging, modules, result.rank, loaded, base_ref, result)
        publish(staging, output)
    finally:
        remove_quietly(staging)
    return result


# ---- one module at a time ---------------------------------------------------------------------------


def _module_changes(
    edited: list[OutputTensor],
    checkpoint: Checkpoint,
    adapter: Adapter,
    scheme: Scheme,
    coeff: float,
    rank: int | None,
    energy: float | None,
    result: LoraExport,
    progress: bool,
) -> dict[str, dict]:
    """module path → {"factors": (B, A), "layer", "report", "bias": Δb}, in the base's tensor order."""
    replaced = {_resolve(checkpoint, name, what=name): name for name in adapter.replacements()}
    modules: dict[str, dict] = {}
    linear: list[bool] = []
    probe = coeff or 1.0  # linearity is checked between probe and 2·probe
    for tensor in tqdm(edited, desc="factoring", unit="tensor", disable=not progress):
        edit = tensor.edit
        if edit.part == "bias" or (edit.part == "replace" and len(tensor.shape) == 1):
            path = edit.state.path if edit.state is not None else _module_path(replaced.get(tensor.name, tensor.name))
            if not tensor.name.endswith(".bias"):
                raise ExportError(
                    f"{adapter.peft_type} changes the 1-D tensor {tensor.name} (a norm or scale vector); a LoRA only "
                    "changes matrices and biases, so it cannot carry this change. Merge the adapter instead "
                    "(`weightsteer merge`)."
                )
            base = checkpoint.read(tensor.source.name).float()
            entry = modules.setdefault(path, {})
            entry["bias"] = edit(base, scheme, coeff) - base
            entry["weight_shape"] = _bias_layer_shape(checkpoint, tensor, edit.state)
            linear.append(_proportional(edit(base, scheme, probe) - base, edit(base, scheme, 2 * probe) - base))
            continue
        if len(tensor.shape) != 2:
            raise ExportError(
                f"{adapter.peft_type} changes {tensor.name} of shape {tensor.shape}; LoRA export handles 2-D weights "
                "(Linear, Conv1D, Embedding) only. Merge the adapter instead (`weightsteer merge`)."
            )
        if edit.part == "weight":
            path, layer, state = edit.state.path, edit.state.layer, edit.state
        else:  # a 2-D tensor the adapter stores whole (modules_to_save, saved embeddings)
            name = replaced.get(tensor.name, tensor.name)
            path, layer, state = _module_path(name), "embedding" if name.endswith(EMBEDDING_SUFFIXES) else "linear", None
        transposed = state is not None and state.fan_in_fan_out
        factors, error, method, proportional = _factor_weight(checkpoint, tensor, adapter.family, state, scheme, coeff, rank, energy)
        linear.append(proportional)
        entry = modules.setdefault(path, {})
        entry.update(factors=factors, layer=layer, fan_in_fan_out=transposed)
        entry["report"] = ModuleExport(path, method, factors[0].shape[1], error, layer)
    result.linear_in_coeff = all(linear)
    if not result.linear_in_coeff:
        result.warnings.append(
            f"ΔW of this {adapter.peft_type} adapter is not linear in coeff under scheme {scheme.name}: a runtime LoRA "
            "scale s does not give coeff s·c. Export one LoRA per coeff instead."
        )
    return modules


def _factor_weight(
    checkpoint: Checkpoint,
    tensor: OutputTensor,
    family: AdapterFamily,
    state: ModuleState | None,
    scheme: Scheme,
    coeff: float,
    rank: int | None,
    energy: float | None,
) -> tuple[Factors, float, str, bool]:
    """(B, A), relative error, "exact" or "svd", and whether ΔW is linear in coeff, for one 2-D tensor."""
    transposed = state is not None and state.fan_in_fan_out
    shape = tuple(tensor.shape[::-1] if transposed else tensor.shape)
    probe = coeff or 1.0  # linearity is checked between probe and 2·probe
    exact = _exact_factors(family, state, scheme, coeff, shape) if state is not None else None
    if exact is not None:
        pair = [_exact_factors(family, state, scheme, c, shape) for c in (probe, 2 * probe)]
        return *_kept_exact(exact, rank, energy), "exact", _proportional(*(b @ a for b, a in pair))
    delta = _delta(checkpoint, tensor, scheme, coeff, transposed)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if energy is None and rank is None:
        numerical = int((s > s[0] * NUMERICAL_RANK_RTOL).sum()) if len(s) else 0
        rank, energy = (numerical, None) if numerical <= DEFAULT_MAX_RANK else (None, DEFAULT_ENERGY)
    factors, error = _truncated(u, s, vh, rank, energy)
    at_probe = delta if coeff else _delta(checkpoint, tensor, scheme, probe, transposed)
    return factors, error, "svd", _proportional(at_probe, _delta(checkpoint, tensor, scheme, 2 * probe, transposed))


def _proportional(once: torch.Tensor, twice: torch.Tensor) -> bool:
    """Is `twice` (the change at 2c) equal to 2·`once` (the change at c), to fp32 accuracy?"""
    scale = float(twice.abs().max()) if twice.numel() else 0.0
    return bool(torch.allclose(2 * once.double(), twice.double(), rtol=0, atol=1e-5 * scale + 1e-12))


def _exact_factors(family: AdapterFamily, state: ModuleState, scheme: Scheme, coeff: float, shape: tuple[int, int]) -> Factors | None:
    """The family's own factors of ΔW at coeff, or None where ΔW is not a product of small factors."""
    if scheme.apply is None:  # delta: c·(W₁ − W)
        factors = family.low_rank(state, shape)
        return None if factors is None else (coeff * factors[0], factors[1])
    return family.low_rank(scheme.apply(state, coeff), shape)


def _delta(checkpoint: Checkpoint, tensor: OutputTensor, scheme: Scheme, coeff: float, transposed: bool) -> torch.Tensor:
    """ΔW at coeff in fp64 (Linear orientation), from the base tensor read now."""
    base = checkpoint.read(tensor.source.name).float()
    delta = (tensor.edit(base, scheme, coeff) - base).double()
    return delta.T if transposed else delta


def _small_svd(factors: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B @ A from the factors alone: B = Q_b R_b, Aᵀ = Q_a R_a, svd(R_b R_aᵀ)."""
    b, a = (f.double() for f in factors)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


def _kept_exact(factors: Factors, rank: int | None, energy: float | None) -> tuple[Factors, float]:
    """Exact factors as they are, unless --rank/--energy asks for fewer ranks (then an SVD of the factors)."""
    b, a = factors
    if energy is None and (rank is None or b.shape[1] <= rank):
        return (b.float().contiguous(), a.float().contiguous()), 0.0
    return _truncated(*_small_svd(factors), rank, energy)


def _truncated(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int | None, energy: float | None) -> tuple[Factors, float]:
    """The best factors of the chosen rank, B = U_k S_k and A = V_kᵀ, and their relative Frobenius error."""
    kept = _choose_rank(s, rank, energy)
    total = float((s**2).sum())
    error = math.sqrt(float((s[kept:] ** 2).sum()) / total) if total > 0 else 0.0
    return ((u[:, :kept] * s[:kept]).float().contiguous(), vh[:kept].float().contiguous()), error


def _choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    squares = s**2
    total = float(squares.sum())
    kept = len(s)
    if energy is not None and total > 0:
        share = torch.cumsum(squares, 0) / total
        kept = int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype))) + 1
    if rank is not None:
        kept = min(kept, rank)
    return max(1, min(kept, len(s)))


def _check_truncation(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise ExportError("Give --rank or --energy, not both.")
    if rank is not None and rank < 1:
        raise ExportError(f"--rank must be a positive integer, got {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise ExportError(f"--energy is the share of ‖ΔW‖² to keep, in (0, 1]; got {energy}.")


def _bias_layer_shape(checkpoint: Checkpoint, bias: OutputTensor, state: ModuleState | None) -> tuple[int, int]:
    """(out, in) of the layer whose bias changes, for the zero factors of a bias-only module."""
    weight = checkpoint.tensors.get(bias.source.name.removesuffix("bias") + "weight")
    if weight is None or len(weight.shape) != 2:
        raise ExportError(f"The adapter changes {bias.name}, but the base has no 2-D weight beside it to attach a LoRA to.")
    transposed = state.fan_in_fan_out if state is not None else weight.shape[1] == bias.shape[0] != weight.shape[0]
    return tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)


def _module_path(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def _add_tied_head(modules: dict[str, dict], checkpoint: Checkpoint, config_patch: dict, edited: list[OutputTensor]) -> None:
    """A merge that keeps the head tied changes it with the embedding; a plain LoRA on the embedding does not,
    so the LoRA gets an lm_head module with the same change."""
    embedding = _tied_embedding(checkpoint)
    if embedding is None or "tie_word_embeddings" in config_patch:
        return
    edit = next((t.edit for t in edited if t.name == embedding and t.edit.state is not None), None)
    entry = modules.get(edit.state.path) if edit is not None else None
    if entry is None or "factors" not in entry:
        return
    head = HEAD.removesuffix(".weight")
    report = replace(entry["report"], module=head, layer="linear")
    modules[head] = {"factors": entry["factors"], "layer": "linear", "report": report}


# ---- writing ------------------------------------------------------------------------------------------


def _write(staging: Path, modules: dict[str, dict], rank: int, adapter: Adapter, base_ref: str, result: LoraExport) -> None:
    tensors: dict[str, torch.Tensor] = {}
    targets, with_bias = [], False
    for path, entry in modules.items():
        targets.append(path)
        key = MODEL_PREFIX + path
        if "factors" in entry:
            b, a = (_pad(f, rank, dim) for f, dim in zip(entry["factors"], (1, 0)))
        else:  # only the bias changes: zero factors carry it
            out_features, in_features = entry["weight_shape"]
            b, a = torch.zeros(out_features, rank), torch.zeros(rank, in_features)
        if entry.get("layer") == "embedding":
            tensors[key + ".lora_embedding_A"] = b.T.contiguous()
            tensors[key + ".lora_embedding_B"] = a.T.contiguous()
            continue
        tensors[key + ".lora_A.weight"] = a
        tensors[key + ".lora_B.weight"] = b
        if "bias" in entry:
            tensors[key + ".lora_B.bias"] = entry["bias"].float().contiguous()
            with_bias = True
    fan_in_fan_out = any(m.get("fan_in_fan_out") for m in modules.values())
    if with_bias:
        for path, entry in modules.items():
            key = MODEL_PREFIX + path + ".lora_B.bias"
            if entry.get("layer") != "embedding" and key not in tensors:
                tensors[key] = torch.zeros(tensors[MODEL_PREFIX + path + ".lora_B.weight"].shape[0])
        result.warnings.append("The LoRA carries bias changes (lora_bias=true): PEFT applies them; vLLM and llama.cpp may not.")
    save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
    config = _lora_config(adapter, base_ref, rank, targets, with_bias, fan_in_fan_out)
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    report = {
        "weightsteer_version": __version__,
        "adapter": str(adapter.path),
        "base_model": base_ref,
        **{k: v for k, v in result.to_dict().items() if k != "path"},
    }
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def _pad(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero rows/columns up to `rank`: BA is unchanged and every module has the same r (scale alpha/r = 1)."""
    missing = rank - factor.shape[dim]
    if missing == 0:
        return factor.contiguous()
    pad_shape = list(factor.shape)
    pad_shape[dim] = missing
    return torch.cat([factor, factor.new_zeros(pad_shape)], dim=dim).contiguous()


def _lora_config(adapter: Adapter, base_ref: str, rank: int, targets: list[str], with_bias: bool, fan_in_fan_out: bool) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": adapter.config.get("task_type"),
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path") or base_ref,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": with_bias,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": targets,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
