"""Run inside the vLLM venv: prompt logprobs and greedy tokens of a checkpoint (optionally with a LoRA), as JSON.

    python vllm_run.py REQUEST.json OUTPUT.json
REQUEST: {"model": DIR, "prompts": [[token ids], ...], "max_tokens": N, "prompt_logprobs": bool,
          "lora": DIR or null, "max_lora_rank": R}
OUTPUT:  {"prompt_logprobs": [[logprob of token i given tokens < i, for i ≥ 1], ...] (when asked),
          "greedy": [[ids], ...], "greedy_logprobs": [[logprob of each greedy token], ...]}
vLLM 0.32 on CPU fails on prompt logprobs with a LoRA active (its LoRA logits processor maps one row per sequence,
not per prompt position), so LoRA runs compare the logprobs of the generated tokens instead.
"""

import json
import sys


def main() -> None:
    request = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    lora = request.get("lora")
    options = dict(enable_lora=True, max_lora_rank=request.get("max_lora_rank", 16), max_loras=1) if lora else {}
    llm = LLM(
        model=request["model"],
        dtype="float32",
        max_model_len=request.get("max_model_len", 256),
        enforce_eager=True,
        seed=0,
        max_num_seqs=4,
        **options,
    )
    prompt_logprobs = 0 if request.get("prompt_logprobs", True) else None
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], prompt_logprobs=prompt_logprobs, logprobs=0)
    lora_request = None
    if lora:
        from vllm.lora.request import LoRARequest

        lora_request = LoRARequest("steer", 1, lora)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    result = {"prompt_logprobs": [], "greedy": [], "greedy_logprobs": []}
    for ids, output in zip(request["prompts"], outputs):
        if prompt_logprobs is not None:
            entries = output.prompt_logprobs[1:]
            result["prompt_logprobs"].append([entry[token].logprob for entry, token in zip(entries, ids[1:])])
        generated = output.outputs[0]
        result["greedy"].append(list(generated.token_ids))
        result["greedy_logprobs"].append([entry[t].logprob for entry, t in zip(generated.logprobs, generated.token_ids)])
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
