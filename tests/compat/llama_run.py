"""Run inside the llama-cpp-python venv: logits of a GGUF model (optionally with a GGUF LoRA at a scale), as .npz.

    python llama_run.py REQUEST.json OUTPUT.npz
REQUEST: {"model": FILE, "prompts": [[token ids], ...], "lora": FILE or null, "lora_scale": S}
OUTPUT:  one float32 array per prompt, "p0", "p1", ...: the logits at every position (tokens × vocab).
The KV cache is f32 (type_k = type_v = 0) and flash attention off, so the whole forward runs in f32. Tokens are
evaluated one at a time ("batch": false, the default): llama.cpp's batched prompt path (matrix-matrix kernels) was
measured 2.4e-3 away from an f64 reference at the position right after SmolLM2's attention sink (activations
~1.8e4) on a merged checkpoint, where transformers in f32 and llama.cpp token by token both stay within 1e-4.
"""

import json
import sys


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
