"""Model paths ≠ stored names (VLMs) and MoE experts: edge cases beyond the shared table in tests/cases.py.

The table compares text-only logits; here every stored tensor (vision tower, projector, each expert) is compared
with PEFT's own merge (merge_and_unload under `scaled`) as transformers' save_pretrained writes it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightsteer
from cases import MOE_CASES, VLM_CASES
from conftest import load_base, make_adapter
from weightsteer.errors import AdapterError
from weightsteer.names import CheckpointNames


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    made = {}

    def get(case):
        if case.id not in made:
            made[case.id] = make_adapter(bases(case.arch), tmp_path_factory.mktemp(case.id) / "adapter", case.config())
        return made[case.id]

    return get


def _stored(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _peft_merged(base, adapter, coeff, folder) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), adapter)
    with torch.no_grad(), weightsteer.scaled(model, coeff):
        merged = model.merge_and_unload()
    merged.save_pretrained(folder)
    return _stored(folder)


def test_save_pretrained_writes_legacy_names(bases):
    """The premise: transformers saves the names Hub checkpoints have, not its module paths."""
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in _stored(bases("llava"))
    assert "model.layers.0.self_attn.q_proj.weight" in _stored(bases("qwen2_vl"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in _stored(bases("mixtral"))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in _stored(bases("qwen3_moe"))


@pytest.mark.parametrize("case", [*VLM_CASES, *MOE_CASES], ids=lambda c: c.id)
def test_every_stored_tensor_matches_peft_merge(case, bases, adapters, tmp_path):
    """At c = −1 (the table covers −1, 0.5, 1 through the logits): each stored tensor vs PEFT's merge."""
    base, adapter = bases(case.arch), adapters(case)
    weightsteer.merge(adapter, tmp_path / "ours", coeff=-1)
    ours, theirs, before = _stored(tmp_path / "ours"), _peft_merged(base, adapter, -1, tmp_path / "peft"), _stored(base)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), f"{name} differs from PEFT's merge"
    changed = [n for n in ours if not torch.equal(ours[n], before[n])]
    # the vision tower / projector / experts really changed, so the comparison means something
    expected = {"vlm": ("vision", "visual", "multi_modal_projector"), "moe": ("experts.", "mlp.gate.", "router")}
    assert any(part in n for n in changed for part in expected[case.id.split("-")[0]]), changed


def _without(base, folder, dropped: tuple[str, ...]):
    folder.mkdir()
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            save_file({n: t for n, t in load_file(f).items() if not n.endswith(dropped)}, folder / f.name, {"format": "pt"})
        else:
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_missing_expert_is_refused_by_number(bases, adapters, tmp_path):
    case = next(c for c in MOE_CASES if c.arch == "mixtral")
    base = _without(bases("mixtral"), tmp_path / "base", ("layers.1.block_sparse_moe.experts.2.w1.weight", "layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj \(4 experts\).*expert 2; merging would leave it unchanged"):
        weightsteer.merge(adapters(case), tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()


def test_partial_expert_is_refused(bases, adapters, tmp_path):
    """An expert with its gate half but no up half would be half merged."""
    case = next(c for c in MOE_CASES if c.arch == "qwen3_moe" and "all-linear" in c.id)
    base = _without(bases("qwen3_moe"), tmp_path / "base", ("layers.0.mlp.experts.1.up_proj.weight",))
    with pytest.raises(AdapterError, match=r"stores no tensors for expert 1\b"):
        weightsteer.merge(adapters(case), tmp_path / "out", base=base)


def test_ambiguous_name_lists_both_name_spaces(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    shapes = {"text.layers.0.q_proj.weight": (4, 4), "vision.layers.0.q_proj.weight": (4, 4)}
    names = CheckpointNames(tmp_path, {"architectures": ["NoSuchModelForCausalLM"]}, shapes)
    with pytest.raises(AdapterError, match=r"the model name 'layers\.0\.q_proj\.weight' matches several stored tensors.*"
                       r"'text\.layers\.0\.q_proj\.weight', 'vision\.layers\.0\.q_proj\.weight'"):
        names.resolve("layers.0.q_proj.weight", "adapter module layers.0.q_proj")


def test_unknown_name_says_transformers_maps_nothing_onto_it(bases, tmp_path):
    from weightsteer.checkpoint import Checkpoint
    from weightsteer.names import names_for

    names = names_for(Checkpoint(bases("llava")))
    assert names.resolve("model.language_model.layers.0.mlp.up_proj.weight", "x") == "language_model.model.layers.0.mlp.up_proj.weight"
    assert names.resolve("lm_head.weight", "x") == "language_model.lm_head.weight"
    with pytest.raises(AdapterError, match=r"no tensor 'model\.language_model\.layers\.0\.mlp\.wrong\.weight' \(nor does "
                       r"LlavaForConditionalGeneration's checkpoint conversion map a stored tensor onto it\)"):
        names.resolve("model.language_model.layers.0.mlp.wrong.weight", "x")
