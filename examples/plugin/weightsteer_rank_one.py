"""A weightsteer format plugin in one module: a "rank-one" steering artefact.

Files: a folder with rank_one.json {"scale": s, "base_model": ...} and rank_one.safetensors holding, per
steered Linear, `<module path>.u` (out,) and `<module path>.v` (in,). Its own runtime (`hooked` below) adds
c·s·u·(v·x) to the module's output, so the merge is W + c·s·u vᵀ. The three jobs stay apart: the Format reads
files (detect, read), the family gives the closed form and the coeff scheme, `hooked` is the runtime twin.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch
from safetensors.torch import load_file

from weightsteer.adapters.base import AdapterFamily, ModuleState, Scheme, scale_scaling, shape_error
from weightsteer.formats import Format


class RankOneFamily(AdapterFamily):
    name = "rank-one"
    peft_types = ()
    tokens = ("u", "v")
    schemes = {"linear": Scheme("linear", "W → W + c·s·u vᵀ", "0: base · 1: as trained · −1: W − s·u vᵀ", scale_scaling)}

    def parse(self, config, tensors, base_shapes, options):  # job 1b: the read tensors → one state per module
        paths = sorted({key.rpartition(".")[0] for key in tensors})
        return [ModuleState(p, {"u": tensors[f"{p}.u"], "v": tensors[f"{p}.v"]}, {"scaling": config["scale"]}) for p in paths]

    def weight(self, state, weight):  # job 2: the closed form, fp32, Linear orientation (out × in)
        return weight + state.scalars["scaling"] * torch.outer(state.tensors["u"], state.tensors["v"])

    def low_rank(self, state, shape):  # lets `weightsteer export-lora` write it exactly
        return state.scalars["scaling"] * state.tensors["u"][:, None], state.tensors["v"][None, :]

    def check_shapes(self, state, weight_shape, bias_shape):
        found = (state.tensors["u"].shape[0], state.tensors["v"].shape[0])
        if found != tuple(weight_shape):
            raise shape_error(state.path, "u vᵀ vs the base weight", found, tuple(weight_shape))


class RankOne(Format):
    name = "rank-one"
    summary = "rank-one steering folder (rank_one.json + rank_one.safetensors with <module>.u / <module>.v)"
    family = RankOneFamily()
    runtime = "weightsteer_rank_one.hooked(model, folder, c)"

    def detect(self, path):  # job 1a: recognise the files, cheaply
        return path.is_dir() and (path / "rank_one.json").is_file()

    def read(self, path):
        meta = json.loads((path / "rank_one.json").read_text())
        tensors = {k: t.float() for k, t in load_file(path / "rank_one.safetensors").items()}
        return self.artefact(path, {"scale": float(meta["scale"]), "base_model_name_or_path": meta.get("base_model")}, tensors)


@contextmanager
def hooked(model: torch.nn.Module, folder, c: float):
    """Job 3, the runtime twin: the format's own forward at strength c, as forward hooks on the live model."""
    artefact = RankOne().read(folder)
    modules = dict(model.named_modules())
    handles = []
    for state in artefact.modules(None, {}):
        u, v, s = state.tensors["u"], state.tensors["v"], state.scalars["scaling"]
        hook = lambda mod, args, y, u=u, v=v, s=s: y + c * s * (args[0] @ v)[..., None] * u  # noqa: E731
        handles.append(modules[state.path].register_forward_hook(hook))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
