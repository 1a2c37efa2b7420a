"""Shared by the families whose forward is W + scaling·ΔW(tensors): AdaLoRA, LoHa, LoKr, FourierFT.

In each, PEFT's live layer keeps every adapter tensor in an nn.ParameterDict named like the saved key
(`layer.hada_w1_a[adapter]`, ...) and one scalar scale in a plain dict (`layer.scaling[adapter]`,
FourierFT: `layer.fourierft_scaling[adapter]`). ΔW is linear in that scale and its no-op value is 0,
so the linear scheme scaling → c·scaling gives W + c·ΔW.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import AdapterError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, scale_scaling



LINEAR = Scheme("linear", "scaling → c·scaling", "0: base · 1: trained · −1: W − ΔW", scale_scaling)


class ScaledDeltaFamily(AdapterFamily):
    """Runtime twin and the linear scheme for a family whose state holds `scaling` plus ParameterDict tensors."""

    scale_attribute: ClassVar[str] = "scaling"  # where the live layer keeps the scale
    conv_only: ClassVar[tuple[str, ...]] = ()  # tensors of PEFT's conv variants: parsed to be refused, not knobs
    knobs = ("scaling",)
    schemes = {"linear": LINEAR}

    def knob_names(self) -> tuple[str, ...]:
        return tuple(name for name in super().knob_names() if name not in self.conv_only)

    def live_scalars(self, layer: torch.nn.Module, adapter: str) -> dict[str, float]:
        """Scalars besides `scaling` that the family's weight() reads."""
        return {}

    def live_state(self, layer: torch.nn.Module, adapter: str, path: str) -> ModuleState:
        tensors = {
            name: getattr(layer, name)[adapter].detach().clone()
            for name in self.tokens
            if adapter in getattr(layer, name, {})
        }
        scalars = {"scaling": getattr(layer, self.scale_attribute)[adapter], **self.live_scalars(layer, adapter)}
        return ModuleState(path, tensors, scalars, fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)))

    def set_live_state(self, layer: torch.nn.Module, adapter: str, state: ModuleState) -> None:
        getattr(layer, self.scale_attribute)[adapter] = state.scalars["scaling"]
        for name, value in state.tensors.items():
            getattr(layer, name)[adapter].data.copy_(value)


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
