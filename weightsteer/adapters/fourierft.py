"""FourierFT: a sparse spectrum whose inverse 2-D Fourier transform is the weight change.

PEFT forward (peft/tuners/fourierft/layer.py, FourierFTLayer.update_layer / get_delta_weight):
  idx = randperm(out·in, generator=Generator().manual_seed(random_loc_seed))[:n]
  S = zeros(out, in);  S[idx // in, idx % in] = fourierft_spectrum
  y = W x + b + ΔW x,   ΔW = scaling · Re(ifft2(S))      (torch's ifft2 divides by out·in)
Only the spectrum (n values) is saved; the positions are re-derived from the seed and the layer's
(out, in) — for Conv1D PEFT reads (in, out) from the stored weight, i.e. the same Linear orientation.
n comes from n_frequency / n_frequency_pattern (fourierft/model.py, its own regex `.*\\.{key}$`).
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from ..errors import AdapterError
from .base import ModuleState, require, shape_error, split_keys
from .scaled_delta import ScaledDeltaFamily, require_matrix

SPECTRUM = "fourierft_spectrum"


class FourierFT(ScaledDeltaFamily):
    name = "FourierFT"
    peft_types = ("FOURIERFT",)
    tokens = (SPECTRUM,)
    scale_attribute = "fourierft_scaling"

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        scalars = {"scaling": config.get("scaling", 150.0), "random_loc_seed": int(config.get("random_loc_seed", 777))}
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        states = []
        for path, params in modules.items():
            require(params, path, SPECTRUM)
            params[SPECTRUM] = params[SPECTRUM].reshape(-1)
            stored, configured = params[SPECTRUM].numel(), _n_frequency(config, path)
            if stored != configured:
                raise AdapterError(
                    f"FourierFT module {path} stores {stored} frequencies but adapter_config.json gives n_frequency = "
                    f"{configured} for it (n_frequency / n_frequency_pattern); the frequency positions depend on it. "
                    "Use the adapter_config.json saved with these weights."
                )
            states.append(ModuleState(path, params, dict(scalars), fan_in_fan_out=fan_in_fan_out))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        require_matrix(self.name, state.path, weight_shape)
        n, (out_features, in_features) = state.tensors[SPECTRUM].numel(), weight_shape
        if n > out_features * in_features:
            found = f"{out_features}×{in_features} = {out_features * in_features}"
            raise shape_error(state.path, "weight size", f"at least {n} entries (one per frequency)", found)

    def weight(self, state, weight):
        spectrum = state.tensors[SPECTRUM]
        rows, cols = seeded_positions(*weight.shape, spectrum.numel(), state.scalars["random_loc_seed"])
        dense = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        dense[rows.to(weight.device), cols.to(weight.device)] = spectrum
        return weight + torch.fft.ifft2(dense).real * state.scalars["scaling"]

    def live_scalars(self, layer: torch.nn.Module, adapter: str) -> dict[str, float]:
        return {**super().live_scalars(layer, adapter), "random_loc_seed": layer.fourierft_random_loc_seed[adapter]}


@lru_cache(maxsize=64)
def seeded_positions(out_features: int, in_features: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each frequency, as FourierFTLayer.update_layer draws them (CPU generator)."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // in_features, flat % in_features


def _n_frequency(config: dict, path: str) -> int:
    """FourierFTModel._create_and_replace: the first pattern key k with re.match(rf".*\\.{k}$", path), else path."""
    pattern = config.get("n_frequency_pattern") or {}
    key = next((k for k in pattern if re.match(rf".*\.{k}$", path)), path)
    return pattern.get(key, config.get("n_frequency", 1000))
