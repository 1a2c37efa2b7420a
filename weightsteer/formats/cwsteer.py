"""cwsteer modulated LoRA / PiSSA adapters (wassname/cwsteer src/cwsteer/{adapter,history}.py).

LoRA (`ModulatedLoRA.save`): one safetensors, keys `A.<m>` (r × in), `B.<m>` (out × r), <m> the module path
with "." → "__"; metadata r, alpha (strings). Hook: y + c·(alpha/r)·B(Ax) → ΔW(c) = c·(alpha/r)·B·A.
PiSSA (`ModulatedPiSSA.save`, metadata kind="pissa"): `U.<m>` (out × r′), `S.<m>`, `Vh.<m>` (r′ × in),
`delta_s.<m>`. On the residual base W − U·diag(S)·Vh the hook adds U·diag(S + c·Δs)·Vh·x, so on the original
base ΔW(c) = c·U·diag(Δs)·Vh, formed here in fp32 from the stored values (as the hook computes; cwsteer's own
bake.pissa_spec_from_checkpoint multiplies in the stored dtype).
History: a run folder of `roundNN/` with adapter.safetensors, calibration.json (signed_C) and judgment.json
(action); the kept rounds apply at their signed_C: W + Σ_k C_k·ΔW_k. A run folder merges at c as
W + c·Σ_k C_k·ΔW_k (c = 1: cwsteer's own bake); a file or round folder at cwsteer's own c.
All are one low-rank change B·A (the rounds' factors side by side). Runtime twin: cwsteer's hooks
(`with adapter(model, c=c):`; a run: `load_base_with_history_specs` + `baked`, scaled by c).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..adapters.base import ModuleState, require
from ..errors import AdapterError
from .base import Format
from .deltas import LowRankDelta

FILE_NAME = "adapter.safetensors"
ROUND = re.compile(r"^round\d+$")
LORA_KEYS = ("A", "B")
PISSA_KEYS = ("U", "S", "Vh", "delta_s")


class CWSteerDelta(LowRankDelta):
    name = "cwsteer"

    def parse(self, config, tensors, base_shapes, options):
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path, _, name = key.rpartition("|")
            modules.setdefault(path, {})[name] = tensor
        return [ModuleState(path, params, {"scaling": 1.0}) for path, params in modules.items()]


class CWSteer(Format):
    name = "cwsteer"
    summary = "cwsteer adapter.safetensors (LoRA A./B. or PiSSA U/S/Vh/delta_s), a round folder or a run folder of rounds"
    family = CWSteerDelta()
    runtime = "cwsteer: with adapter(model, c=c): ... (forward hooks)"

    def detect(self, path):
        file = _adapter_file(path)
        if file is not None:
            return _kind(file) is not None
        return path.is_dir() and any(ROUND.match(p.name) and (p / FILE_NAME).is_file() for p in path.iterdir())

    def read(self, path):
        file = _adapter_file(path)
        rounds = [(file, 1.0)] if file is not None else _kept_rounds(path)
        kinds = {_kind(f) for f, _ in rounds}
        if len(kinds) > 1:
            raise AdapterError(f"{path}: kept rounds mix LoRA and PiSSA adapters; cwsteer itself does not compose them.")
        factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for round_file, signed_c in rounds:
            for module, (b, a) in _factors(round_file).items():
                factors.setdefault(module, []).append((signed_c * b, a))
        tensors = {}
        for module, pairs in factors.items():
            tensors[f"{module}|B"] = torch.cat([b for b, _ in pairs], dim=1)
            tensors[f"{module}|A"] = torch.cat([a for _, a in pairs], dim=0)
        return self.artefact(path, {"kind": kinds.pop(), "rounds": len(rounds)}, tensors)


def _adapter_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    return path / FILE_NAME if (path / FILE_NAME).is_file() else None


def _kind(file: Path) -> str | None:
    """"lora" or "pissa" from the key prefixes and metadata; None if this is not a cwsteer file."""
    try:
        with safe_open(str(file), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
    except Exception:
        return None
    prefixes = {k.split(".", 1)[0] for k in keys}
    if metadata.get("kind") == "pissa" and prefixes == set(PISSA_KEYS):
        return "pissa"
    if "kind" not in metadata and prefixes == set(LORA_KEYS) and "r" in metadata and "alpha" in metadata:
        return "lora"
    return None


def _factors(file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path → (B, A) in fp32 with ΔW = B·A at cwsteer's c = 1."""
    tensors = {k: v.float() for k, v in load_file(str(file)).items()}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, mangled = key.partition(".")
        by_module.setdefault(mangled.replace("__", "."), {})[prefix] = tensor
    kind = _kind(file)
    for module, params in by_module.items():
        require(params, module, *(PISSA_KEYS if kind == "pissa" else LORA_KEYS))
    if kind == "pissa":
        return {m: (t["U"] * t["delta_s"], t["Vh"]) for m, t in by_module.items()}  # U·diag(Δs), Vh
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    scale = float(metadata["alpha"]) / float(metadata["r"])
    return {m: (scale * t["B"], t["A"]) for m, t in by_module.items()}


def _kept_rounds(run: Path) -> list[tuple[Path, float]]:
    """(adapter file, signed_C) of every round whose judgment is "keep", in round order."""
    kept = []
    for folder in sorted(p for p in run.iterdir() if ROUND.match(p.name)):
        judgment = folder / "judgment.json"
        if not judgment.is_file() or json.loads(judgment.read_text()).get("action") != "keep":
            continue
        calibration = folder / "calibration.json"
        if not calibration.is_file():
            raise AdapterError(f"Kept round {folder} has no calibration.json (its signed_C); the run folder is incomplete.")
        kept.append((folder / FILE_NAME, float(json.loads(calibration.read_text())["signed_C"])))
    if not kept:
        raise AdapterError(f"{run}: no round is kept (judgment.json action \"keep\"); nothing to merge.")
    return kept
