"""Shared by the families whose live PEFT layer keeps each saved tensor under its saved name, and by
those whose forward is W + scaling·ΔW(tensors): AdaLoRA, LoHa, LoKr, FourierFT, GraLoRA, Peanut, PSOFT, WaveFT.

`TensorDictFamily`: the live layer holds every adapter tensor in a ParameterDict/BufferDict entry or a
ModuleDict entry named like the saved key (`layer.hada_w1_a[adapter]`, `layer.peanut_A[adapter].weight`),
and scalars in plain dicts (`layer.scaling[adapter]`). `ScaledDeltaFamily` adds the linear scheme for
W + scaling·ΔW: ΔW is linear in the scale and its no-op value is 0, so scaling → c·scaling gives W + c·ΔW.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import AdapterError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, live_tensors, scale_scaling

LINEAR = Scheme("linear", "scaling → c·scaling", "0: base · 1: trained · −1: W − ΔW", scale_scaling)


class TensorDictFamily(AdapterFamily):
    """Runtime twin for a family whose live layer keeps its tensors under the saved names (see live_tensors)."""

    live_scalar_names: ClassVar[dict[str, str]] = {}  # state scalar → the live layer's dict holding it

    def live_scalars(self, layer: torch.nn.Module, adapter: str) -> dict[str, float]:
        """Scalars the family's weight() reads, from the live layer."""
        return {name: getattr(layer, attribute)[adapter] for name, attribute in self.live_scalar_names.items()}

    def live_state(self, layer: torch.nn.Module, adapter: str, path: str) -> ModuleState:
        tensors = {name: t.detach().clone() for name, t in live_tensors(layer, adapter, self.tokens).items()}
        fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        return ModuleState(path, tensors, self.live_scalars(layer, adapter), fan_in_fan_out=fan_in_fan_out)

    def set_live_state(self, layer: torch.nn.Module, adapter: str, state: ModuleState) -> None:
        for name, attribute in self.live_scalar_names.items():
            getattr(layer, attribute)[adapter] = state.scalars[name]
        for name, live in live_tensors(layer, adapter, self.tokens).items():
            if name in state.tensors:
                live.data.copy_(state.tensors[name])


class ScaledDeltaFamily(TensorDictFamily):
    """The linear scheme for a family whose state holds `scaling` (W + scaling·ΔW), plus the runtime twin."""

    scale_attribute: ClassVar[str] = "scaling"  # where the live layer keeps the scale
    conv_only: ClassVar[tuple[str, ...]] = ()  # tensors of PEFT's conv variants: parsed to be refused, not knobs
    knobs = ("scaling",)
    schemes = {"linear": LINEAR}

    def knob_names(self) -> tuple[str, ...]:
        return tuple(name for name in super().knob_names() if name not in self.conv_only)

    def live_scalars(self, layer: torch.nn.Module, adapter: str) -> dict[str, float]:
        return {"scaling": getattr(layer, self.scale_attribute)[adapter], **super().live_scalars(layer, adapter)}

    def set_live_state(self, layer: torch.nn.Module, adapter: str, state: ModuleState) -> None:
        getattr(layer, self.scale_attribute)[adapter] = state.scalars["scaling"]
        super().set_live_state(layer, adapter, state)


def require_matrix(family: str, path: str, weight_shape: tuple[int, ...]) -> None:
    """Only Linear and Conv1D bases (2-D weights) are merged; PEFT's conv variants reshape differently."""
    if len(weight_shape) != 2:
        raise UnsupportedAdapterError(
            f"{family} module {path} adapts a base weight of shape {tuple(weight_shape)}; weightsteer merges {family} "
            "into Linear and Conv1D layers (2-D weights) only."
        )


def check_configured_rank(path: str, configured: int, tensor: str, stored: int) -> None:
    """The scale α/r uses the configured r: refuse when it disagrees with the rank the tensors were saved with."""
    if stored != configured:
        raise AdapterError(
            f"Adapter module {path}: {tensor} has rank {stored} but adapter_config.json gives r = {configured} "
            "for this module (r / rank_pattern), so the scale α/r would be wrong. Use the adapter_config.json "
            "saved with these weights."
        )
