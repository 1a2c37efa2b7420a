"""Benchmark: `weightsteer sweep` — 11 coeffs × 16 prompts × 32 tokens, the CLI's defaults.

A rank-8 LoRA on every linear layer, its B perturbed away from zero (seeded; no training), is swept over the
default coeffs on the built-in prompts. Printed: the model load, the measurement itself (wall and CPU time), the
generated tokens per second, the machine's load average while it ran, and the same for a calibration to a KL
budget.

    python benchmarks/bench_sweep.py                        # SmolLM2-135M, the quickstart base, on the CPU
    python benchmarks/bench_sweep.py --model /models/Llama-3.2-1B-Instruct --device cuda   # a >= 1B model on a GPU
    python benchmarks/bench_sweep.py --shape 1b --tokenizer DIR --device cuda   # random Llama-3.2-1B-shape weights

--shape builds a randomly initialised Llama of that shape (bf16) with the tokenizer of DIR (default: the SmolLM2
base; its tokenizer.json, tokenizer_config.json and chat_template.jinja are enough), for a machine without a
model: the texts are noise, the timings are those of the shape.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sweep_module = importlib.import_module("weightsteer.sweep")  # the module (weightsteer.sweep is the function)
SHAPES = {  # hidden, layers, intermediate, heads, kv heads (the vocabulary is the tokenizer's)
    "1b": (2048, 16, 8192, 32, 8),
    "3b": (3072, 28, 8192, 24, 8),
    "8b": (4096, 32, 14336, 32, 8),
}
SMOLLM2 = Path(os.environ.get("WEIGHTSTEER_COMPAT_DIR") or Path.home() / ".cache" / "weightsteer-compat") / "smollm2" / "base"


def perturbed_lora(model_dir: Path, out: Path, scale: float) -> Path:
    """A rank-8 LoRA on all linear layers with B ~ N(0, scale²), saved against model_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, low_cpu_mem_usage=True)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(model_dir)}))
    return out


def random_llama(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised bf16 Llama of SHAPES[shape] with the tokenizer (and chat template) of tokenizer_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, layers, intermediate, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=len(tokenizer), tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def timed(label: str, run):
    """Wall time, and this process's CPU time: on a machine that other work loads, CPU time / threads is closer
    to what the same run takes on an idle one."""
    load_before, cpu = os.getloadavg()[0], time.process_time()
    start = time.perf_counter()
    result = run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    load = f"load average {load_before:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    print(f"{label}: {seconds:.1f} s wall, {cpu:.1f} s CPU on {torch.get_num_threads()} threads  ({load})", flush=True)
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SMOLLM2, help="base model folder [default: the SmolLM2 base]")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="instead of --model: random weights of this Llama shape")
    parser.add_argument("--tokenizer", type=Path, default=SMOLLM2, help="with --shape: folder of the tokenizer")
    parser.add_argument("--device", help="cpu, cuda, ... [default: cuda if available]")
    parser.add_argument("--dtype", help="model dtype [default: float32 on the CPU, the base's elsewhere]")
    parser.add_argument("--prompts", type=int, default=16, help="how many built-in prompts (repeated past 16)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-scale", type=float, default=0.1, help="std of the perturbed lora_B (0.1: c* near 1 on SmolLM2)")
    parser.add_argument("--target-kl", type=float, default=1.0, help="also time a calibration to this budget (0: skip)")
    args = parser.parse_args()
    needed = args.tokenizer / "tokenizer_config.json" if args.shape else args.model / "config.json"
    if not needed.is_file():
        sys.exit(f"{needed} is missing (for SmolLM2: bash tests/compat/setup_compat.sh smollm2)")
    builtin = sweep_module.default_prompts()
    prompts = [builtin[i % len(builtin)] for i in range(args.prompts)]
    coeffs = list(sweep_module.DEFAULT_COEFFS)
    with tempfile.TemporaryDirectory() as tmp:
        model = random_llama(args.shape, args.tokenizer, Path(tmp) / f"llama-{args.shape}") if args.shape else args.model
        print(f"model {model}, torch {torch.__version__}")
        adapter = perturbed_lora(model, Path(tmp) / "adapter", args.lora_scale)
        open_args = (adapter, None, None, args.device, args.dtype, None, prompts, None, args.tokens, args.batch_size, True)
        session, _ = timed("load (base + PEFT adapter)", lambda: sweep_module._Session.open(*open_args))
        print(f"device {session.device}, dtype {next(session.model.parameters()).dtype}")
        label = f"sweep: {len(coeffs)} coeffs × {len(prompts)} prompts × {args.tokens} tokens"
        points, seconds = timed(label, lambda: session.measure(coeffs, False, "sweep"))
        generated = len(coeffs) * len(prompts) * args.tokens
        print(f"  {generated / seconds:.0f} generated tokens/s (at most {generated} tokens; rows stop at end of sequence)")
        for c in coeffs:
            p = points[c]
            print(f"  c = {c:>5g}: kl_p95 {p.kl_p95:8.3g}  nll_base {p.nll_base:6.3g}  distinct2 {p.distinct2:.2f}")
        if args.target_kl > 0:
            target = sweep_module.KLTarget(args.target_kl)
            found, _ = timed(f"calibration to p95 KL {args.target_kl:g} after the sweep", lambda: session.search(target, points, False))
            print(f"  c_pos = {found[0]}" + (f" ({found[1]})" if found[1] else ""))


if __name__ == "__main__":
    main()
