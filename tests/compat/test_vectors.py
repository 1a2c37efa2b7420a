"""A steering vector baked into SmolLM2 (a bias on layers.5 down_proj, mlp_bias: true, zero gate/up biases) loads in
vLLM and in llama.cpp (llama.cpp's own converter) and matches transformers; and the control vector that
`weightsteer export-vector` writes, applied by llama.cpp on the base (what --control-vector-scaled does), matches
the baked model.

Needs `bash tests/compat/setup_compat.sh smollm2 llama vllm`; each test skips without its part.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weightsteer
from compat_support import CACHE, hf_logits, need, run_script
from compat_support import prompt_ids, smollm2_base  # noqa: F401  (fixtures)
from test_llama_cpp import assert_close, llama_cpp, llama_logits, llama_python  # noqa: F401  (fixtures)
from test_vllm import MAX_TOKENS, VLLM_ENV, assert_same, reference, vllm_python  # noqa: F401  (fixtures)
from weightsteer.formats.control_vector import export_vector
from weightsteer.llamacpp import convert_model

pytestmark = pytest.mark.compat
LAYER = 5
COEFF = -1.5
_BUILT: dict[str, dict] = {}


@pytest.fixture(scope="module")
def baked(smollm2_base, tmp_path_factory) -> dict:
    """A steering-lite mean_diff vector after block 5 (fp32, norm 4) and SmolLM2 with it baked at COEFF."""
    if "baked" not in _BUILT:
        root = tmp_path_factory.mktemp("vector")
        v = torch.randn(576, generator=torch.Generator().manual_seed(0))
        cfg = {"method": "mean_diff", "layers": [LAYER], "target": "residual", "target_submodule": None, "coeff": 1.0, "dtype": "float32"}
        vector = root / "vector.safetensors"
        save_file({f"layer{LAYER}.v": 4 * v / v.norm()}, vector, metadata={"cfg": json.dumps(cfg)})
        merged = weightsteer.merge(vector, root / "baked", base=smollm2_base, coeff=COEFF)
        _BUILT["baked"] = {"root": root, "vector": vector, "merged": merged}
    return _BUILT["baked"]


def test_baked_vector_in_vllm(vllm_python, baked, prompt_ids, tmp_path):
    merged = baked["merged"]
    assert json.loads((merged / "config.json").read_text())["mlp_bias"] is True
    request = {"model": str(merged), "prompts": prompt_ids, "max_tokens": MAX_TOKENS}
    served = json.loads(run_script(vllm_python, "vllm_run.py", request, tmp_path / "out.json", VLLM_ENV).read_text())
    assert_same(served, reference(merged, prompt_ids), f"vLLM vs transformers on SmolLM2 with a vector baked at {COEFF}")


def test_baked_vector_in_llama_cpp_and_control_vector(llama_python, llama_cpp, smollm2_base, baked, prompt_ids, tmp_path):
    options = dict(llama_cpp=llama_cpp, python=str(llama_python))
    expected = hf_logits(baked["merged"], prompt_ids)
    gguf = convert_model(baked["merged"], tmp_path / "baked-f32.gguf", **options).path
    assert_close(llama_logits(llama_python, gguf, prompt_ids, tmp_path), expected, "llama.cpp on the baked GGUF vs transformers")

    control = export_vector(baked["vector"], tmp_path / "vector.gguf", coeff=1.0, base=smollm2_base).path
    base_gguf = convert_model(smollm2_base, tmp_path / "base-f32.gguf", **options).path
    gguf_py = need(CACHE / "llama.cpp" / "gguf-py", "llama", "llama.cpp's gguf-py")
    request = {"model": str(base_gguf), "prompts": prompt_ids, "control_vector": str(control), "control_vector_scale": COEFF, "gguf_py": str(gguf_py)}
    out = run_script(llama_python, "llama_run.py", request, tmp_path / "cvec.npz")
    arrays = np.load(out)
    assert_close([arrays[f"p{i}"] for i in range(len(prompt_ids))], expected, f"llama.cpp --control-vector-scaled {COEFF} vs the baked model")
