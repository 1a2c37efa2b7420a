"""Check weightsteer's BOFT merge with several butterfly factors (N > 1) against PEFT's forward on a GPU.

PEFT builds N > 1 only when its CUDA extension (fbd_cuda) compiles; on CPU it silently uses N = 1, so
the CPU test suite checks N > 1 only against a dense reconstruction. This script closes the gap:

  1. builds a tiny Llama and a BOFT adapter with boft_n_butterfly_factor = N on CUDA, perturbs it away from
     its init and saves it (boft_R has shape (N, D, b, b));
  2. merges it with weightsteer on the CPU at every coeff of both schemes;
  3. compares the merged model's logits with PEFT's forward on the GPU under `weightsteer.scaled`.

Run on a machine with a CUDA GPU, nvcc and ninja:  python benchmarks/boft_gpu_check.py [--factors 2 3]
Exit status 0 when every case is within --atol.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import weightsteer

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127, 3, 42, 77]])
COEFFS = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def load(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def build_adapter(base: Path, folder: Path, factors: int) -> Path:
    from peft import BOFTConfig, get_peft_model

    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, target_modules=TARGETS)
    model = get_peft_model(load(base, "cuda"), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = (torch.randn(p.shape, generator=generator) * 0.1).to(p.device)
                p.copy_(1 + noise if "boft_s" in name else p + noise)
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "boft_R" in n}
    if any(shape[0] != factors for shape in shapes):
        sys.exit(f"PEFT built boft_R with shapes {shapes}, not N = {factors}: did fbd_cuda fail to compile?")
    model.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(data, indent=2))
    return folder


def peft_logits(base: Path, adapter: Path, coeff: float, scheme: str) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(base, "cuda"), adapter).eval()
    with torch.no_grad(), weightsteer.scaled(model, coeff, scheme=scheme):
        return model(TOKENS.cuda()).logits.cpu()


def merged_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load(path, "cuda")(TOKENS.cuda()).logits.cpu()


def check(root: Path, factors: int, atol: float) -> bool:
    base = build_base(root / "base")
    adapter = build_adapter(base, root / f"boft_n{factors}", factors)
    base_logits = merged_logits(base)
    ok = True
    for scheme in ("linear", "power"):
        for coeff in COEFFS:
            out_path = root / f"merged_{factors}_{scheme}_{coeff:g}"
            out = weightsteer.merge(adapter, out_path, coeff=coeff, scheme=scheme, device="cpu")
            expected = peft_logits(base, adapter, coeff, scheme)
            error = (merged_logits(out) - expected).abs().max().item()
            effect = (expected - base_logits).abs().max().item()
            passed = error <= atol and (coeff == 0 or effect > 10 * atol)
            ok &= passed
            verdict = "ok" if passed else "FAIL"
            print(f"N={factors} {scheme:6} c={coeff:+.1f}  merged vs PEFT max|Δlogit| {error:.2e}  effect {effect:.2e}  {verdict}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 3], help="butterfly factors N (default 2 3)")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("No CUDA device: PEFT builds BOFT with N > 1 only on a GPU.")
    from peft.tuners.boft.layer import get_fbd_cuda

    if get_fbd_cuda() is None:
        sys.exit("PEFT's fbd_cuda extension did not compile (needs nvcc and ninja); PEFT would fall back to N = 1.")
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(Path(tmp) / f"n{n}", n, args.atol) for n in args.factors]
    print("all cases agree" if all(results) else "SOME CASES DISAGREE")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
