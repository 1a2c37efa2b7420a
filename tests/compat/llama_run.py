"""Run inside the llama-cpp-python venv: logits of a GGUF model (optionally with a GGUF LoRA at a scale), as .npz.

    python llama_run.py REQUEST.json OUTPUT.npz
REQUEST: {"model": FILE, "prompts": [[token ids], ...], "lora": FILE or null, "lora_scale": S,
          "control_vector": FILE or null, "control_vector_scale": S, "gguf_py": llama.cpp's gguf-py folder}
OUTPUT:  one float32 array per prompt, "p0", "p1", ...: the logits at every position (tokens × vocab).
The KV cache is f32 (type_k = type_v = 0) and flash attention off, so the whole forward runs in f32. Tokens are
evaluated one at a time ("batch": false, the default): llama.cpp's batched prompt path (matrix-matrix kernels) was
measured 2.4e-3 away from an f64 reference at the position right after SmolLM2's attention sink (activations
~1.8e4) on a merged checkpoint, where transformers in f32 and llama.cpp token by token both stay within 1e-4.
"""

import json
import sys


def set_control_vector(llm, path: str, scale: float, gguf_py: str) -> None:
    """What `--control-vector-scaled PATH SCALE` does: common.cpp's common_control_vector_load_one (re-implemented
    here: it is part of llama.cpp's command-line tools, not of the library) reads direction.N (N >= 1, F32, 1-D)
    into data[(N - 1) * n_embd ...] += scale * v, then llama.cpp's own llama_set_adapter_cvec applies it to layers
    1 ... n_layer (the default --control-vector-layer-range)."""
    import numpy as np
    import llama_cpp

    sys.path.insert(0, gguf_py)
    import gguf

    directions = {}
    for tensor in gguf.GGUFReader(path).tensors:
        layer = int(tensor.name.split(".", 1)[1])
        assert tensor.name.startswith("direction.") and layer > 0 and tensor.tensor_type == gguf.GGMLQuantizationType.F32
        directions[layer] = np.array(tensor.data, dtype=np.float32)
    n_embd = len(next(iter(directions.values())))
    data = np.zeros(n_embd * max(directions), dtype=np.float32)
    for layer, v in directions.items():
        data[(layer - 1) * n_embd : layer * n_embd] += np.float32(scale) * v
    n_layer = llama_cpp.llama_model_n_layer(llm._model.model)
    pointer = data.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
    if llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, data.size, n_embd, 1, n_layer) != 0:
        raise RuntimeError("llama_set_adapter_cvec failed")


def main() -> None:
    request = json.load(open(sys.argv[1]))
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(ids) for ids in request["prompts"])
    llm = Llama(
        model_path=request["model"],
        lora_path=request.get("lora"),
        lora_scale=float(request.get("lora_scale", 1.0)),
        n_ctx=max(64, longest),
        n_batch=max(64, longest),
        n_threads=int(request.get("threads", 2)),
        logits_all=True,
        type_k=0,
        type_v=0,
        flash_attn=False,
        verbose=False,
    )
    if request.get("control_vector"):
        set_control_vector(llm, request["control_vector"], float(request.get("control_vector_scale", 1.0)), request["gguf_py"])
    arrays = {}
    for i, ids in enumerate(request["prompts"]):
        llm.reset()
        if request.get("batch", False):
            llm.eval(ids)
        else:
            for token in ids:
                llm.eval([token])
        arrays[f"p{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    np.savez(sys.argv[2], **arrays)


if __name__ == "__main__":
    main()
