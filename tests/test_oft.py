"""OFT edge cases: the untied embedding, power round trips, the Cayley maps against references, refusals. The
runtime-match rows (Cayley–Neumann and exact Cayley, block_share, coft, embeddings, the quarter-turn hook; linear
and power schemes) are in tests/cases.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import OFTConfig, PeftModel

import weightsteer
from cases import ROWS
from conftest import TOKENS, load_base, make_adapter, model_logits
from weightsteer.adapters.oft import OFT

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def oft_adapter(bases, tmp_path, **options):
    scale = options.pop("scale", 0.1)
    config = OFTConfig(oft_block_size=16, target_modules=options.pop("target_modules", ATTN_MLP), **options)
    return make_adapter(bases("llama"), tmp_path / "a", config, scale=scale)


def test_oft_embedding_unties_a_tied_head(bases, tmp_path):
    """The forward rotates only the lookup: the head keeps E, the checkpoint is untied."""
    adapter = ROWS["oft-embedding-llama_tied"].adapter(bases("llama_tied"), tmp_path / "a")
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_oft_embedding_is_right_rotation():
    """E' = E R, not E Rᵀ (PEFT's Embedding.merge: E @ oft_mat)."""
    torch.manual_seed(0)
    rows = 0.3 * torch.randn(2, 6)
    state = OFT()._state({"use_cayley_neumann": False}, "embed_tokens", {"oft_embedding_R": rows})
    weight = torch.randn(5, 8)
    skew = torch.zeros(2, 4, 4)
    i, j = torch.triu_indices(4, 4, 1)
    skew[:, i, j] = rows
    skew = skew - skew.mT
    eye = torch.eye(4).expand(2, 4, 4)
    blocks = torch.linalg.solve(eye + skew, eye - skew, left=False)
    torch.testing.assert_close(OFT().weight(state, weight), weight @ torch.block_diag(*blocks), atol=1e-6, rtol=0)


@pytest.mark.parametrize("neumann", [True, False])
def test_oft_power_group(bases, tmp_path, neumann):
    """R^c is a group: merging at −1 and running the adapter at +1 gives the base; ½ then ½ gives 1.

    (No embedding here: PEFT saves the whole original embedding with the adapter and loads it over the new base.)
    """
    base = bases("llama")
    adapter = oft_adapter(bases, tmp_path, use_cayley_neumann=neumann)
    inverse = weightsteer.merge(adapter, tmp_path / "minus", coeff=-1, scheme="power")
    with torch.no_grad():
        model = PeftModel.from_pretrained(load_base(inverse), adapter).eval()
        round_trip = model(TOKENS).logits
    assert (round_trip - model_logits(base)).abs().max() < 1e-4
    half = weightsteer.merge(adapter, tmp_path / "half", coeff=0.5, scheme="power")
    twice = weightsteer.merge(adapter, tmp_path / "twice", base=half, coeff=0.5, scheme="power")
    once = weightsteer.merge(adapter, tmp_path / "once", coeff=1, scheme="power")
    assert (model_logits(twice) - model_logits(once)).abs().max() < 1e-4


def test_oft_linear_inverts_only_exact_cayley(bases, tmp_path):
    """Q → −Q gives Rᵀ: the inverse for the exact Cayley map, not for the truncated Neumann series."""
    base = bases("llama")
    errors = {}
    for neumann in (True, False):
        adapter = oft_adapter(bases, tmp_path / str(neumann), use_cayley_neumann=neumann, scale=0.3)
        inverse = weightsteer.merge(adapter, tmp_path / f"minus{neumann}", coeff=-1)
        with torch.no_grad():
            round_trip = PeftModel.from_pretrained(load_base(inverse), adapter).eval()(TOKENS).logits
        errors[neumann] = (round_trip - model_logits(base)).abs().max().item()
    assert errors[False] < 1e-4 < errors[True]


def test_neumann_series_matches_peft_term_for_term():
    from peft.tuners.oft.layer import OFTRotationModule

    torch.manual_seed(0)
    rows = 0.2 * torch.randn(3, 10)
    for terms in range(1, 8):
        module = OFTRotationModule(3, 10, 5, 15, num_cayley_neumann_terms=terms)
        expected = module._cayley_batch(rows, 5, True, terms)
        state = OFT()._state({"num_cayley_neumann_terms": terms}, "x", {"oft_R": rows})
        weight = torch.eye(15)
        torch.testing.assert_close(OFT().weight(state, weight), torch.block_diag(*expected).T, atol=1e-6, rtol=0)


def test_pre_014_oft_is_refused(bases, tmp_path):
    adapter = oft_adapter(bases, tmp_path, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["oft_block_size"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(weightsteer.UnsupportedAdapterError, match="predates PEFT 0.14"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_power_refuses_neumann_block_without_real_power():
    """A Neumann block whose eigenvalue p(iθ) is 0 (θ = 1 for 5 terms): R is singular, R^½ has no real value."""
    rows = torch.zeros(1, 1)
    rows[0, 0] = 1.0
    state = OFT()._state({}, "m", {"oft_R": rows}).with_scalars(power=0.5)
    with pytest.raises(weightsteer.SchemeError, match="no real value"):
        OFT().weight(state, torch.eye(2))
    assert math.isfinite(OFT().weight(state.with_scalars(power=2.0), torch.eye(2)).sum().item())
