"""Adapter families, one module each, and loading a saved PEFT adapter folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from ..checkpoint import json_kind
from ..errors import AdapterError, UnsupportedAdapterError
from ..registry import Registry
from .base import AdapterFamily, ModuleState, Scheme, ShapeLookup, split_keys

# The built-in families: PEFT's peft_type → the family that merges it. Plugins add theirs as entry points
# (see weightsteer.registry); both go through one Registry.
BUILTIN = {
    "LORA": "weightsteer.adapters.lora:LoRA",
    "DELORA": "weightsteer.adapters.delora:DeLoRA",
    "VERA": "weightsteer.adapters.vera:VeRA",
    "IA3": "weightsteer.adapters.ia3:IA3",
    "ROAD": "weightsteer.adapters.road:RoAd",
    "ADALORA": "weightsteer.adapters.adalora:AdaLoRA",
    "LOHA": "weightsteer.adapters.loha:LoHa",
    "LOKR": "weightsteer.adapters.lokr:LoKr",
    "OFT": "weightsteer.adapters.oft:OFT",
    "BOFT": "weightsteer.adapters.boft:BOFT",
    "HRA": "weightsteer.adapters.hra:HRA",
    "RANDLORA": "weightsteer.adapters.randlora:RandLoRA",
    "VBLORA": "weightsteer.adapters.vblora:VBLoRA",
    "FOURIERFT": "weightsteer.adapters.fourierft:FourierFT",
    "C3A": "weightsteer.adapters.c3a:C3A",
    "SHIRA": "weightsteer.adapters.shira:SHiRA",
    "MISS": "weightsteer.adapters.miss:MiSS",
    "BONE": "weightsteer.adapters.miss:MiSS",
    "LN_TUNING": "weightsteer.adapters.ln_tuning:LNTuning",
    "TRAINABLE_TOKENS": "weightsteer.adapters.trainable_tokens:TrainableTokens",
    "POLY": "weightsteer.adapters.poly:Poly",
    "HIRA": "weightsteer.adapters.hira:HiRA",
    "BEFT": "weightsteer.adapters.beft:BEFT",
    "GLORA": "weightsteer.adapters.glora:GLoRA",
    "GRALORA": "weightsteer.adapters.gralora:GraLoRA",
    "PEANUT": "weightsteer.adapters.peanut:Peanut",
    "PSOFT": "weightsteer.adapters.psoft:PSOFT",
    "PVERA": "weightsteer.adapters.vera:PVeRA",
    "SUPERTUNING": "weightsteer.adapters.supertuning:Supertuning",
    "WAVEFT": "weightsteer.adapters.waveft:WaveFT",
    "DEFT": "weightsteer.adapters.deft:DeFT",
    "FROD": "weightsteer.adapters.frod:FRoD",
    "UNILORA": "weightsteer.adapters.unilora:UniLoRA",
    "TINYLORA": "weightsteer.adapters.tinylora:TinyLoRA",
    "OSF": "weightsteer.adapters.osf:OSF",
    "ADAMSS": "weightsteer.adapters.adamss:AdaMSS",
}

FAMILIES = Registry(BUILTIN, AdapterFamily)

_VIRTUAL_TOKENS = (
    "{name} adds learned virtual tokens in front of the input; it changes no weight, so there is nothing to bake "
    "into the model. Keep using it as a prompt prefix (PEFT at runtime)."
)
# Types that are not weight changes, with the reason a user is given.
REFUSED = {
    "PROMPT_TUNING": _VIRTUAL_TOKENS.format(name="Prompt tuning"),
    "P_TUNING": _VIRTUAL_TOKENS.format(name="P-tuning"),
    "MULTITASK_PROMPT_TUNING": _VIRTUAL_TOKENS.format(name="Multitask prompt tuning"),
    "CPT": _VIRTUAL_TOKENS.format(name="CPT (context-aware prompt tuning)"),
    "PREFIX_TUNING": (
        "Prefix tuning adds learned keys and values that every token attends to; attention over extra positions "
        "is not expressible as a weight change. Keep it as a runtime adapter."
    ),
    "ADAPTION_PROMPT": (
        "Adaption prompt adds a gated attention term over learned prompts that depends on each token's query; "
        "it cannot be folded into weights (its gate is a runtime-only strength)."
    ),
    "XLORA": (
        "X-LoRA mixes its LoRA experts with weights that change per token, so no single weight matrix reproduces "
        "it. Merge one expert instead (pass its sub-folder, e.g. ADAPTER/0, as the adapter), at the coeff you want."
    ),
    "CARTRIDGE": (
        "Cartridges store a trained KV cache that is served as past_key_values, like prefix tuning; attention over "
        "extra positions is not expressible as a weight change. Keep it as a runtime adapter."
    ),
    "LILY": (
        "Lily mixes its shared B experts with router weights averaged over the tokens of each input, so its change "
        "depends on the input and no fixed weight reproduces it (PEFT cannot merge it either)."
    ),
    "SHADOW": (
        "ShadowPEFT runs a trainable shadow network alongside the frozen model and injects its state into every "
        "block; the change depends on the input and is not a weight delta (PEFT cannot merge it either)."
    ),
}

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def family_for(peft_type: str) -> AdapterFamily:
    """The family object for a PEFT type name (e.g. "LORA")."""
    if peft_type in REFUSED:
        raise UnsupportedAdapterError(f"Cannot merge a {peft_type} adapter: {REFUSED[peft_type]}")
    if peft_type not in FAMILIES:
        known = ", ".join(FAMILIES.names())
        raise UnsupportedAdapterError(
            f"Adapter type {peft_type!r} is not supported by weightsteer (it merges: {known}). "
            "If a package adds it, install that package; otherwise merge with PEFT or open an issue."
        )
    return FAMILIES.get(peft_type)


def all_families() -> list[AdapterFamily]:
    """One instance per family (BONE reuses MiSS)."""
    return FAMILIES.unique()


@dataclass
class Adapter:
    """A saved PEFT adapter: its config, its tensors (fp32) and the family that reads them."""

    path: Path
    config: dict
    family: AdapterFamily
    tensors: dict[str, torch.Tensor]

    @property
    def peft_type(self) -> str:
        return self.config["peft_type"]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def modules(self, base_shapes: ShapeLookup, options: Mapping[str, object] | None = None) -> list[ModuleState]:
        reason = self.family.refusal(self.config)
        if reason is not None:
            raise UnsupportedAdapterError(f"Cannot merge this {self.peft_type} adapter: {reason}")
        try:
            return self.family.parse(self.config, self.tensors, base_shapes, options or {})
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
            # A config value or tensor of an unexpected type or shape that no check above anticipated.
            raise AdapterError(
                f"{self.path}: cannot read this {self.peft_type} adapter ({type(e).__name__}: {e}); its "
                f"{CONFIG_NAME} or tensors are malformed."
            ) from None

    def replacements(self) -> dict[str, torch.Tensor]:
        """Base tensors the adapter stores whole (modules_to_save, trained biases, saved embeddings)."""
        return split_keys(self.tensors, self.family.tokens, self.family.shared_tokens, nested=self.family.nested)[1]

    def config_patch(self, base_config: Mapping[str, object]) -> dict[str, object]:
        """config.json keys the merged model needs to load the change (e.g. mlp_bias for a new bias); none for PEFT."""
        return {}


def load_adapter(path: str | Path) -> Adapter:
    """Read adapter_config.json and the adapter weights from a local folder."""
    path = Path(path)
    config = read_config(path)
    family = family_for(config["peft_type"])
    tensors = _read_tensors(path)
    _check_rank(config, tensors, path / CONFIG_NAME)
    return Adapter(path, config, family, tensors)


def read_config(folder: Path) -> dict:
    """A folder's adapter_config.json, checked (see `check_config`)."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}; pass the folder PEFT's save_pretrained wrote.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from None
    check_config(config, config_path)
    return config


# Types of the config fields weightsteer reads across families (PEFT's *Config dataclasses); None is allowed.
_NUMBER = (int, float)
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,),
    "lora_alpha": _NUMBER,
    "alpha": _NUMBER,
    "rank_pattern": (dict,),
    "alpha_pattern": (dict,),
    "target_modules": (str, list),
    "modules_to_save": (list,),
    "layers_to_transform": (int, list),
    "feedforward_modules": (str, list),
    "trainable_token_indices": (list, dict),
    "use_rslora": (bool,),
    "use_dora": (bool,),
    "fan_in_fan_out": (bool,),
    "base_model_name_or_path": (str,),
    "init_lora_weights": (bool, str),
}


_TYPE_NAMES = {int: "whole number", str: "string", list: "list", dict: "JSON object", bool: "true/false"}


def check_config(config: object, where: Path) -> None:
    """The shape of an adapter_config.json, before any family reads it: an object with a string peft_type,
    and the common fields of the types PEFT writes (see CONFIG_TYPES)."""
    if not isinstance(config, dict):
        raise AdapterError(f"{where} holds a JSON {json_kind(config)}, not an object; is it a PEFT adapter config?")
    if "peft_type" not in config:
        raise AdapterError(f"{where} has no peft_type; is it a PEFT adapter config?")
    if not isinstance(config["peft_type"], str):
        raise AdapterError(f"{where}: peft_type is {json.dumps(config['peft_type'])}, not a type name such as \"LORA\".")
    for key, types in CONFIG_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if wrong or (isinstance(value, float) and not math.isfinite(value)):
            expected = "number" if types == _NUMBER else " or ".join(_TYPE_NAMES[t] for t in types)
            raise AdapterError(f"{where}: {key} is {json.dumps(value)[:60]}, but PEFT writes a {expected} there.")


def _check_rank(config: dict, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """A rank no saved tensor has is a config that does not belong to these tensors (PEFT would fail to load
    them, after allocating r-sized matrices: r = 10^8 is tens of GB)."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]  # AdaLoRA's pattern holds masks
    largest = max((d for t in tensors.values() for d in t.shape), default=0)
    for r in ranks:
        if isinstance(r, int) and not isinstance(r, bool) and (r < 0 or r > largest):
            raise AdapterError(
                f"{where}: r = {r}, but no tensor in the adapter has a dimension that large (largest {largest}); "
                "the config does not match the saved tensors."
            )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = (path / n for n in WEIGHTS_NAMES)
    try:
        if safetensors_path.is_file():
            tensors = load_file(safetensors_path)
        elif bin_path.is_file():
            # weights_only refuses pickled code; adapters are small, so loading them whole is fine.
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise AdapterError(f"{path} has no {' or '.join(WEIGHTS_NAMES)}.")
    except AdapterError:
        raise
    except Exception as e:  # safetensors and torch.load raise their own types for truncated or corrupt files
        raise AdapterError(f"{path}: the adapter weights cannot be read ({type(e).__name__}: {e}); the file is corrupt.") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterError(f"{bin_path}: not a dict of tensors; the adapter file is corrupt.")
    if not tensors:
        raise AdapterError(f"{path}: the adapter file holds no tensors; was it saved before training?")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"Adapter tensor {name!r} in {path} contains NaN or inf; the adapter is broken.")
    return {n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}



def scheme_table() -> str:
    """Every family × scheme as a Markdown table (the README's table is generated from this)."""
    rows = ["| adapter | scheme | formula | c = 0 · 1 · −1 | base at c = 0 |", "|---|---|---|---|---|"]
    for family in all_families():
        default = family.scheme(None).name
        for scheme in family.scheme_rows():
            marker = " (default)" if scheme.name == default else ""
            zero = "yes" if scheme.base_at_zero else "**no**"
            rows.append(f"| {family.name} | `{scheme.name}`{marker} | {scheme.formula} | {scheme.meaning} | {zero} |")
        if family.knob_names():
            knobs = ", ".join(f"`knob:{k}`" for k in family.knob_names())
            rows.append(f"| {family.name} | {knobs} | p → c·p for that one parameter | as PEFT computes it | **no** |")
    from ..formats import all_formats  # formats import this package

    for fmt in all_formats():
        for scheme in fmt.family.schemes.values():
            rows.append(f"| {fmt.name} (format) | `{scheme.name}` (default) | {scheme.formula} | {scheme.meaning} | yes |")
    return "\n".join(rows)


__all__ = ["Adapter", "AdapterFamily", "ModuleState", "Scheme", "ShapeLookup", "family_for", "all_families", "load_adapter", "scheme_table"]
