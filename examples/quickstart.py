"""Quickstart, fully offline: a tiny Llama and a DeLoRA steering adapter made on the spot, merged at
coeff −1 and +1 with the CLI, then checked against PEFT's runtime at the same coeffs.

    python examples/quickstart.py [WORKDIR]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from peft import DeloraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import weightsteer

workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart")
base, adapter = workdir / "base", workdir / "honest-adapter"

# 1. A tiny base model and a "trained" adapter (parameters moved away from their init).
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
AutoModelForCausalLM.from_config(config).save_pretrained(base)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), DeloraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn_like(p))
model.save_pretrained(adapter)

# 2. Bake it in at both poles, from one read of the base (the base path is in the adapter config).
subprocess.run(
    ["weightsteer", "merge", str(adapter), "--base", str(base), "--coeff", "-1", "--coeff", "1", "-o", str(workdir / "model"), "--overwrite"],
    check=True,
)

# 3. The merged checkpoints are plain transformers models; they match PEFT's runtime at the same coeff.
tokens = torch.tensor([[1, 17, 42, 99, 7]])
runtime = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
for coeff in (-1, 1):
    merged = AutoModelForCausalLM.from_pretrained(workdir / f"model-c{coeff}").eval()
    with torch.no_grad(), weightsteer.scaled(runtime, coeff):
        gap = (merged(tokens).logits - runtime(tokens).logits).abs().max().item()
    print(f"coeff {coeff:+d}: merged vs PEFT runtime, max |Δlogit| = {gap:.2e}")
