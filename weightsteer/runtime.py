"""`scaled`: the runtime twin of a merge — the same coeff scheme applied to a live PEFT model."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterator, Mapping

import torch

from .adapters import family_for
from .adapters.base import MODEL_PREFIX, scale_scaling
from .errors import AdapterError, SchemeError

PEFT_ONLY_KWARGS = ("task_ids", "adapter_names")  # tuner-layer arguments the wrapped base layer does not take


@contextmanager
def scaled(
    model: torch.nn.Module,
    coeff: float | Mapping[str, float],
    *,
    scheme: str | Mapping[str, str | None] | None = None,
    adapter: str | None = None,
) -> Iterator[torch.nn.Module]:
    """Run a PEFT model's adapter at strength `coeff`, in place; everything is restored on exit.

    Uses the same scheme as `weightsteer.merge(..., coeff=coeff, scheme=scheme)`, so a checkpoint
    merged at c and this model under `scaled(model, c)` compute the same function. `coeff` may map
    adapter names to coeffs, {"honest": 0.5, "formal": -0.3}, for a PeftModel (or PeftMixedModel) with
    those adapters loaded and all active: each runs at its own coeff, as `merge([Steer(...), ...])` bakes them;
    `scheme` may then map adapter names to schemes as well.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise AdapterError(
            f"scaled() needs a PEFT model with an adapter (e.g. PeftModel.from_pretrained(base, adapter)); got a "
            f"{type(model).__name__}."
        )
    if isinstance(coeff, Mapping):
        if adapter is not None:
            raise SchemeError("With a mapping of coeffs, name the adapters in its keys, not with adapter=.")
        coeffs = dict(coeff)
        if not coeffs:
            raise SchemeError("Give at least one adapter name and coeff.")
    else:
        coeffs = {adapter or model.active_adapter: coeff}
    _check_active(model, coeffs)
    with ExitStack() as stack:
        for name, c in coeffs.items():
            chosen = scheme.get(name) if isinstance(scheme, Mapping) else scheme
            stack.enter_context(_scaled_adapter(model, name, c, chosen, alone=len(coeffs) == 1))
        yield model


def _check_active(model: torch.nn.Module, coeffs: Mapping[str, float]) -> None:
    """Every named adapter is loaded; several are all active (PEFT runs only the active ones)."""
    loaded = list(model.peft_config)
    missing = [name for name in coeffs if name not in loaded]
    if missing:
        raise AdapterError(
            f"The model has no adapter named {', '.join(map(repr, missing))}; its adapters: {', '.join(map(repr, loaded))}."
        )
    active = set(model.base_model.active_adapters)
    inactive = [name for name in coeffs if name not in active]
    if len(coeffs) > 1 and inactive:
        names = list(coeffs)
        raise SchemeError(
            f"Adapters {', '.join(map(repr, inactive))} are loaded but not active; activate all of them first: "
            f"model.base_model.set_adapter({names!r})."
        )


@contextmanager
def _scaled_adapter(model: torch.nn.Module, adapter: str, coeff: float, scheme: str | None, alone: bool) -> Iterator[None]:
    """One adapter of the model at strength coeff, restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    if not math.isfinite(coeff):
        raise SchemeError(f"coeff must be a finite number, got {coeff}.")
    config = model.peft_config[adapter]
    family = family_for(getattr(config.peft_type, "value", config.peft_type))
    chosen = family.scheme(scheme)
    refusal = family.refusal(config.to_dict())
    if refusal is not None:
        raise SchemeError(f"coeff cannot be applied to this adapter: {refusal}")
    if getattr(config, "bias", "none") != "none":
        raise SchemeError(
            f"The adapter trains the base biases (bias={config.bias!r}); the live model no longer knows their base "
            "values, so coeff cannot be applied to them at runtime. Compare against a merged checkpoint instead."
        )
    if chosen.apply is None and not alone:
        raise SchemeError(
            "Scheme delta scales a layer's whole output change, which several active adapters share; at runtime it "
            "works for one adapter at a time. Use another scheme, or merge the composition and compare the checkpoint."
        )
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and any(adapter in getattr(module, n, {}) for n in module.adapter_layer_names)
    ]
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save]
    with ExitStack() as stack:
        hooked = [] if chosen.apply is not None else [m for _, m in layers if not hasattr(m, "parameter_name")]
        for module in hooked:
            family.check_live_delta(module, adapter)
            stack.enter_context(_delta_hook(module, coeff))
        # A PEFT ParamWrapper (target_parameters, LoRA only) changes one parameter of a module whose output is not
        # affine in it (an MoE expert stack), so `delta` is applied in weight space there: ΔP = s·L R exactly
        # (ParamWrapper allows no DoRA or lora_bias), so P + c·ΔP is scaling → c·scaling.
        apply = chosen.apply or scale_scaling
        skipped = {id(m) for m in hooked}
        states = [(m, family.live_state(m, adapter, _path(name))) for name, m in layers if id(m) not in skipped]
        for module, state in states:
            stack.callback(family.set_live_state, module, adapter, state)
        for module, state in states:
            family.set_live_state(module, adapter, apply(state, coeff))
        if chosen.interpolates_replacements:
            stack.enter_context(_interpolated(_stored_whole(wrappers, adapter), coeff))
        yield


def _path(name: str) -> str:
    return name[len(MODEL_PREFIX) :] if name.startswith(MODEL_PREFIX) else name


@contextmanager
def _delta_hook(module: torch.nn.Module, coeff: float):
    """y = y_base + c·(y_adapted − y_base): the output of W + c(W₁ − W), since a layer is affine in W."""

    def hook(layer, args, kwargs, output):
        base_kwargs = {k: v for k, v in kwargs.items() if k not in PEFT_ONLY_KWARGS}
        base = layer.get_base_layer()(*args, **base_kwargs)
        return base + coeff * (output - base)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _stored_whole(wrappers: list, adapter: str) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(trained parameter, its base value) for every modules_to_save copy, each Parameter once: with
    ensure_weight_tying the head's wrapper shares the embedding's copy (peft/utils/other.py,
    ModulesToSaveWrapper tied_module), and interpolating it once per wrapper would give strength c²."""
    pairs: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for wrapper in wrappers:
        original = dict(wrapper.original_module.named_parameters())
        for name, p in wrapper.modules_to_save[adapter].named_parameters():
            pairs.setdefault(id(p), (p, original[name]))
    return list(pairs.values())


@contextmanager
def _interpolated(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]], coeff: float):
    """modules_to_save copies: p(c) = p₀ + c(p₁ − p₀), as the merge writes them."""
    saved = [p.detach().clone() for p, _ in pairs]
    for (p, original), trained in zip(pairs, saved):
        p.data.copy_(original + coeff * (trained - original))
    try:
        yield
    finally:
        for (p, _), trained in zip(pairs, saved):
            p.data.copy_(trained)
