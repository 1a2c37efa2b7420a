"""Benchmark: `weightsteer sweep` — 11 coeffs × 16 prompts × 32 tokens, the CLI's defaults.

A rank-8 LoRA on every linear layer, its B perturbed away from zero (seeded; no training), is swept over the
default coeffs on the built-in prompts. Printed: the model load, the measurement itself, the generated tokens
per second, the machine's load average while it ran, and the same for a calibration to a KL budget.

    python benchmarks/bench_sweep.py                        # SmolLM2-135M, the quickstart base, on the CPU
    python benchmarks/bench_sweep.py --model /models/Llama-3.2-1B-Instruct --device cuda   # a >= 1B model on a GPU
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
SMOLLM2 = Path(os.environ.get("WEIGHTSTEER_COMPAT_DIR") or Path.home() / ".cache" / "weightsteer-compat") / "smollm2" / "base"


def perturbed_lora(model_dir: Path, out: Path, scale: float) -> Path:
    """A rank-8 LoRA on all linear layers with B ~ N(0, scale²), saved against model_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, low_cpu_mem_usage=True)
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
    parser.add_argument("--device", help="cpu, cuda, ... [default: cuda if available]")
    parser.add_argument("--dtype", help="model dtype [default: float32 on the CPU, the base's elsewhere]")
    parser.add_argument("--prompts", type=int, default=16, help="how many built-in prompts (repeated past 16)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-scale", type=float, default=0.1, help="std of the perturbed lora_B (0.1: c* near 1 on SmolLM2)")
    parser.add_argument("--target-kl", type=float, default=1.0, help="also time a calibration to this budget (0: skip)")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} is not a model folder (for SmolLM2: bash tests/compat/setup_compat.sh smollm2)")
    builtin = sweep_module.default_prompts()
    prompts = [builtin[i % len(builtin)] for i in range(args.prompts)]
    coeffs = list(sweep_module.DEFAULT_COEFFS)
    print(f"model {args.model}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = perturbed_lora(args.model, Path(tmp) / "adapter", args.lora_scale)
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
