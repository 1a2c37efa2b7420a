"""Benchmark: merged weight of one multiplicative adapter, PEFT's merge against weightsteer's closed form.

One Linear layer of a Llama MLP up_proj shape (out 5632, in 2048, fp32, no bias) in a tiny container is
wrapped with PEFT's get_peft_model, for each of OFT (Cayley–Neumann, default; exact Cayley), BOFT (one
butterfly factor), HRA (r = 8), RoAd (road_1, road_4) and IA3. The adapter parameters are perturbed away
from their init (noise; multiplicative ones around 1), saved with save_pretrained and read back with weightsteer's
parser (load_adapter → modules). Then, per type, with the same base weight W:

  peft         the tuner layer's `merge()` (what merge_and_unload calls), on a fresh copy of W each repeat
  weightsteer  `family.weight(state, W)` for the state at coeff 1 of the family's default scheme (the scheme
               itself is applied once, untimed)

Times are the median of --repeats runs after one warm-up, with time.perf_counter and torch using every
CPU core this process may run on. The two merged weights must agree to 1e-4 of max |W_peft|, else the
script exits with an error. ratio = peft ms / weightsteer ms.

    python benchmarks/bench_rotations.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
from peft import BOFTConfig, HRAConfig, IA3Config, OFTConfig, RoadConfig, get_peft_model

from weightsteer.adapters import ShapeLookup, load_adapter
from weightsteer.merge import _keep_freed_memory_for_reuse

OUT_FEATURES, IN_FEATURES = 5632, 2048
TARGET = "up_proj"
TOLERANCE = 1e-4  # of max |W_peft|
CASES = {
    "OFT (Cayley-Neumann)": OFTConfig(target_modules=[TARGET], r=0, oft_block_size=32),
    "OFT (exact Cayley)": OFTConfig(target_modules=[TARGET], r=0, oft_block_size=32, use_cayley_neumann=False),
    "BOFT (1 factor)": BOFTConfig(target_modules=[TARGET], boft_block_size=32, boft_n_butterfly_factor=1),
    "HRA (r=8)": HRAConfig(target_modules=[TARGET], r=8),
    "RoAd road_1": RoadConfig(target_modules=[TARGET], variant="road_1"),
    "RoAd road_4": RoadConfig(target_modules=[TARGET], variant="road_4"),
    "IA3": IA3Config(target_modules=[TARGET], feedforward_modules=[]),
}
MULTIPLICATIVE = ("ia3_l", "boft_s", "road_alpha")  # init 1, set to 1 + 0.1·N(0, 1); the others get + 0.05·N(0, 1)


class Container(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.up_proj = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
        self.up_proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.up_proj(x)


def median_ms(fn, repeats: int, setup=lambda: None) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up; setup() runs untimed before each call."""
    times = []
    for _ in range(repeats + 1):
        setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def bench(label: str, config, weight: torch.Tensor, folder: str, repeats: int) -> tuple[float, float, float]:
    """(peft ms, weightsteer ms, max |W_peft − W_weightsteer|) for one adapter config."""
    model = get_peft_model(Container(weight), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:  # the adapter's own parameters
                noise = torch.randn_like(parameter)
                if any(token in name for token in MULTIPLICATIVE):
                    parameter.copy_(1 + 0.1 * noise)
                else:
                    parameter.add_(0.05 * noise)
    model.save_pretrained(folder)

    adapter = load_adapter(folder)
    (state,) = adapter.modules(ShapeLookup({f"{TARGET}.weight": (OUT_FEATURES, IN_FEATURES)}), {})
    family = adapter.family
    scheme = family.scheme(None)
    if scheme.apply is not None:
        state = scheme.apply(state, 1.0)

    layer = model.base_model.model.up_proj
    base = layer.get_base_layer()

    def fresh_copy():
        base.weight.data = weight.clone()
        layer.merged_adapters.clear()

    with torch.no_grad():
        peft_ms = median_ms(layer.merge, repeats, fresh_copy)
        ours_ms = median_ms(lambda: family.weight(state, weight), repeats)
        diff = (base.weight - family.weight(state, weight)).abs().max().item()
        scale = base.weight.abs().max().item()
    if diff > TOLERANCE * scale:
        raise SystemExit(
            f"{label}: merged weights differ by {diff:.3g} (max |W_peft| {scale:.3g}), "
            f"above {TOLERANCE:g} of it"
        )
    return peft_ms, ours_ms, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement, after one warm-up")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    # PEFT's BOFT tries to build its CUDA kernel, warns that it cannot, and uses one butterfly factor (as asked).
    warnings.filterwarnings("ignore", message="Failed to load the CUDA extension|Setting boft_n_butterfly_factor")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    # The allocator settings weightsteer's merge runs under (both sides get them): without them each fresh
    # 46 MB result is zero-filled page by page, which made the small timings vary up to 3x between runs.
    _keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    weight = 0.02 * torch.randn(OUT_FEATURES, IN_FEATURES)
    print(f"one Linear {OUT_FEATURES}x{IN_FEATURES} fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after a warm-up; ratio = PEFT ms / weightsteer ms")
    print(f"{'type':<22} {'PEFT ms':>10} {'weightsteer ms':>15} {'ratio':>8} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as root:
        for i, (label, config) in enumerate(CASES.items()):
            peft_ms, ours_ms, diff = bench(label, config, weight, os.path.join(root, str(i)), args.repeats)
            print(f"{label:<22} {peft_ms:10.1f} {ours_ms:15.1f} {peft_ms / ours_ms:7.1f}x {diff:11.2e}", flush=True)


if __name__ == "__main__":
    main()
