"""The shared table of cases: architecture × adapter config × schemes.

Every row is checked by tests/test_cases.py the same way: merged logits vs PEFT's live forward under
`weightsteer.scaled` at every coeff (≤ 1e-4 fp32), and c = 0 byte-identical to the base for every scheme
that promises it. A new architecture or adapter type is a row here, not a new test file; per-family files
keep only their edge cases. Configs are factories so that PEFT is imported only when a case runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    id: str
    arch: str  # a name conftest.tiny_config knows
    config: Callable[[], object]  # () -> a PEFT config
    schemes: tuple[str | None, ...] = (None, "delta")
    coeffs: tuple[float, ...] = COEFFS
    scale: float = 0.1  # perturbation of the trained parameters
    around_one: tuple[str, ...] = ()  # parameters perturbed around 1 instead of their init
    atol: float = 1e-4
    marks: tuple = field(default_factory=tuple)


def _lora(**kwargs):
    def make():
        from peft import LoraConfig

        return LoraConfig(**kwargs)

    return make


# ---- PEFT types on the reference architectures ------------------------------------------------------
TYPE_CASES = [
    Case("lora-llama", "llama", _lora(r=4, lora_alpha=8, target_modules=ATTN_MLP), (None, "delta", "knob:scaling")),
    Case("lora-gpt2-conv1d", "gpt2", _lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
]

# ---- architectures (real-world checkpoints as transformers saves them) -------------------------------
MODEL_CASES: list[Case] = []

CASES = [*TYPE_CASES, *MODEL_CASES]
