"""The shared table of cases: architecture × adapter config × schemes.

Every row is checked by tests/test_cases.py the same way: merged logits vs PEFT's live forward under
`weightsteer.scaled` at every coeff (≤ 1e-4 fp32), and c = 0 byte-identical to the base for every scheme
that promises it. A new architecture or adapter type is a row here, not a new test file; per-family files
keep only their edge cases. Configs are factories so that PEFT is imported only when a case runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


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
    scheme_coeffs: Mapping[str | None, tuple[float, ...]] = field(default_factory=dict)  # a scheme's own coeffs
    options: Mapping[str, object] = field(default_factory=dict)  # merge and runtime keywords (Poly's task_id)
    build: Callable[[Path, Path, "Case"], Path] | None = None  # (base, folder, case) -> adapter, not make_adapter

    def coeffs_for(self, scheme: str | None) -> tuple[float, ...]:
        return self.scheme_coeffs.get(scheme, self.coeffs)

    def adapter(self, base: Path, folder: Path) -> Path:
        """The row's adapter for `base`, saved in `folder`: PEFT's own, perturbed (conftest.make_adapter)."""
        if self.build is not None:
            return self.build(base, folder, self)
        from conftest import make_adapter

        return make_adapter(base, folder, self.config(), scale=self.scale, around_one=self.around_one)


def _lora(**kwargs):
    def make():
        from peft import LoraConfig

        return LoraConfig(**kwargs)

    return make


def _peft(config_class: str, **kwargs):
    def make():
        import peft

        return getattr(peft, config_class)(**kwargs)

    return make


GPT2 = ["c_attn", "c_proj", "c_fc"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# ---- PEFT types on the reference architectures ------------------------------------------------------
TYPE_CASES = [
    Case("lora-llama", "llama", _lora(r=4, lora_alpha=8, target_modules=ATTN_MLP), (None, "delta", "knob:scaling", "knob:lora_A")),
    Case("lora-gpt2-conv1d", "gpt2", _lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    # PEFT 0.21 types (issue 13): one adapter per row, shared by its schemes.
    Case("hira-llama", "llama", _peft("HiraConfig", r=4, target_modules=[*ATTN_MLP, "embed_tokens"]), scale=0.3),
    Case("hira-gpt2-conv1d", "gpt2", _peft("HiraConfig", r=4, target_modules=GPT2, fan_in_fan_out=True), (None,), scale=1.0),
    Case("beft-qwen2-bias", "qwen2", _peft("BeftConfig", target_modules=["q_proj", "k_proj", "v_proj"])),
    Case("glora-llama", "llama", _peft("GloraConfig", r=4, target_modules=ATTN_MLP)),
    Case("glora-vector-llama", "llama", _peft("GloraConfig", config_A_B="vector", target_modules=ATTN), (None,)),
    Case("glora-qwen2-bias", "qwen2", _peft("GloraConfig", r=4, config_C="none", config_D_E="vector", target_modules=["q_proj", "v_proj"]), (None,)),
    Case("gralora-llama", "llama", _peft("GraloraConfig", r=4, gralora_k=2, hybrid_r=2, alpha=8, target_modules=ATTN_MLP)),
    Case("gralora-gpt2-conv1d", "gpt2", _peft("GraloraConfig", r=4, gralora_k=2, alpha=8, target_modules=GPT2, fan_in_fan_out=True), (None,)),
    Case("peanut-llama", "llama", _peft("PeanutConfig", r=4, depth=2, scaling=2.0, target_modules=ATTN_MLP)),
    Case("pvera-llama", "llama", _peft("PveraConfig", r=4, target_modules=ATTN_MLP)),
    Case("pvera-gpt2-conv1d", "gpt2", _peft("PveraConfig", r=4, target_modules=GPT2, fan_in_fan_out=True, save_projection=False), (None,), scale=0.5),
    Case("supertuning-llama", "llama", _peft("SupertuningConfig", sparsity=0.95, r=2, target_modules=ATTN_MLP)),
    Case("supertuning-recomputed-positions", "llama", _peft("SupertuningConfig", sparsity=0.9, save_precomputed_indices=False, target_modules=ATTN), (None,)),
    Case("waveft-llama", "llama", _peft("WaveFTConfig", n_frequency=200, wavelet_family="db2", target_modules=ATTN_MLP)),
    Case("waveft-no-idwt-gpt2-conv1d", "gpt2", _peft("WaveFTConfig", n_frequency=200, use_idwt=False, target_modules=GPT2, fan_in_fan_out=True), (None,)),
    Case("deft-llama", "llama", _peft("DeftConfig", r=4, alpha=8, target_modules=ATTN_MLP)),
    Case("deft-qr-gpt2-conv1d", "gpt2", _peft("DeftConfig", r=4, decomposition_method="qr", target_modules=GPT2, fan_in_fan_out=True), (None,)),
    Case("para-llama", "llama", _peft("DeftConfig", r=4, para=True, target_modules=ATTN), (None,), scale=0.3),
    Case("frod-llama", "llama", _peft("FrodConfig", target_modules=ATTN_MLP), scale=0.15),
    Case("frod-gpt2-conv1d", "gpt2", _peft("FrodConfig", target_modules=GPT2, fan_in_fan_out=True), (None,), scale=0.15),
    Case("unilora-llama", "llama", _peft("UniLoraConfig", r=4, theta_d_length=512, save_indices=True, target_modules=ATTN_MLP), scale=0.3),
    Case("unilora-gpt2-conv1d", "gpt2", _peft("UniLoraConfig", r=4, theta_d_length=512, save_indices=True, target_modules=GPT2, fan_in_fan_out=True), (None,), scale=0.3),
    Case("tinylora-llama", "llama", _peft("TinyLoraConfig", r=4, u=8, weight_tying=0.5, target_modules=[*ATTN, "embed_tokens"]), scale=0.15),
    Case("tinylora-gpt2-conv1d", "gpt2", _peft("TinyLoraConfig", r=4, u=8, target_modules=GPT2, fan_in_fan_out=True), (None,), scale=0.5),
    Case("osf-llama", "llama", _peft("OSFConfig", effective_rank=48, target_modules=ATTN), scale=0.05),
    Case("adamss-llama", "llama", _peft("AdamssConfig", r=16, num_subspaces=3, subspace_rank=2, target_modules=ATTN_MLP)),
    Case("adamss-qwen2-bias", "qwen2", _peft("AdamssConfig", r=16, num_subspaces=4, random_seed=3, target_modules=[*ATTN, "up_proj"])),
    # LoRA variants PEFT merges (issue 13)
    Case("dora-embedding-llama", "llama", _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"])),
    Case("velora-llama", "llama", _lora(r=4, target_modules=ATTN, velora_config={"num_groups": 4}), (None,)),
    Case("monteclora-llama", "llama", _lora(r=4, target_modules=ATTN, monteclora_config={}), (None,)),
    Case("bdlora-a-and-b-llama", "llama", _lora(r=4, target_modules=ATTN_MLP, use_bdlora={"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "nblocks": 2})),
    Case("bdlora-b-only-llama", "llama", _lora(r=4, target_modules=["q_proj", "v_proj"], use_bdlora={"target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2}), (None,)),
    Case("kasa-llama", "llama", _lora(r=4, target_modules=ATTN, kasa_config={}), ("knob:scaling",)),
    Case("lora-target-parameters-gpt2-conv1d", "gpt2", _lora(r=4, target_modules=[], target_parameters=["attn.c_attn.weight", "mlp.c_fc.weight"]), (None,)),
    Case("ln-tuning-gpt2-conv1d", "gpt2", _peft("LNTuningConfig", target_modules=["ln_1", "c_attn"]), (None,)),
    Case("psoft-llama", "llama", _peft("PsoftConfig", r=4, psoft_alpha=8, target_modules=ATTN_MLP), around_one=("vector_",), scale=0.3),
    Case("psoft-lowrank-pissa-neumann-llama", "llama", _peft("PsoftConfig", r=4, psoft_svd="lowrank", ab_svd_init="pissa_init", use_cayley_neumann=True, target_modules=ATTN), (None,), around_one=("vector_",), scale=0.3),
]

def _tokens(**kwargs):
    def make():
        from peft import TrainableTokensConfig

        return TrainableTokensConfig(**kwargs)

    return make


# ---- the adapter families' own rows (their files under tests/ keep only edge cases) -------------------
# A row that needs more than PEFT's perturbed adapter builds it: `_checked` asserts what PEFT saved (the layout
# the row is about), `_edited` turns the saved tensors into the special case the row names.
ZERO = dict(schemes=(None,), coeffs=(0,))  # c = 0 is the base, byte for byte (on a sharded base: every shard)
SCALING_SHORT = {"knob:scaling": (-1, 2)}
FAMILY_CASES: list[Case] = []  # not in TYPE_CASES, whose rows tests/test_types.py also runs `verify` on


def _edited(change: Callable[[dict], dict | None]):
    def build(base: Path, folder: Path, case: Case) -> Path:
        from safetensors.torch import load_file, save_file

        from conftest import make_adapter

        adapter = make_adapter(base, folder, case.config(), scale=case.scale, around_one=case.around_one)
        edited = change(load_file(adapter / WEIGHTS))
        if edited is not None:
            save_file(edited, adapter / WEIGHTS)
        return adapter

    return build


def _checked(premise: Callable[[dict], bool]):
    def check(tensors: dict) -> None:
        assert premise(tensors), f"PEFT did not save the layout this row is about: {sorted(tensors)[:4]}…"

    return _edited(check)


def _suffixes(tensors: dict) -> set[str]:
    return {key.rsplit(".", 1)[-1] for key in tensors}


# LoRA (tests/test_lora.py: refusals, tied embeddings untied)
LORA_EMBEDDING = ("llama", "llama_tied", "gemma")
FAMILY_CASES += [
    Case(
        "lora-rslora-patterns-bias-qwen2",
        "qwen2",
        _lora(r=4, lora_alpha=8, use_rslora=True, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"],
              rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
        (None,),
    ),
    *(Case(f"lora-embedding-{arch}", arch, _lora(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), (None,)) for arch in LORA_EMBEDDING),
    Case("dora-llama", "llama", _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]), (None, "knob:scaling"), scheme_coeffs={"knob:scaling": (0.5, 1, 2)}),
    Case("dora-gpt2-conv1d", "gpt2", _lora(r=4, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True), (None,)),
    Case("lora-modules-to-save-head-llama", "llama", _lora(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), (None,)),
    # PEFT saves a single fan_in_fan_out flag, which is wrong for either the Conv1D layers or lm_head.
    Case("lora-conv1d-and-linear-head-gpt2", "gpt2", _lora(r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True), (None,), coeffs=(-1, 1)),
    Case("lora-zero-sharded", "llama:sharded", _lora(r=4, target_modules=ATTN_MLP), **ZERO),
]

# DeLoRA (tests/test_delora.py: biases untouched, refusals)
FAMILY_CASES += [
    Case(
        "delora-patterns-llama",
        "llama",
        _peft("DeloraConfig", r=4, delora_lambda=2, target_modules=ATTN_MLP, rank_pattern={"down_proj": 2},
              lambda_pattern={"layers.1.self_attn.q_proj": 5}),
        (None, "delta", "knob:delora_lambda", "knob:delora_B"),
    ),
    Case("delora-qwen2-bias", "qwen2", _peft("DeloraConfig", r=4, delora_lambda=2, target_modules=ATTN_MLP), (None, "delta", "knob:delora_A")),
    # PEFT's forward reads the saved delora_w_norm, not the base's current norms: so must the merge.
    Case(
        "delora-stored-norms-llama",
        "llama",
        _peft("DeloraConfig", r=4, delora_lambda=2, target_modules=["q_proj", "down_proj"]),
        (None,),
        coeffs=(-1, 1, 2),
        build=_edited(lambda tensors: {k: v * 3 if k.endswith("delora_w_norm") else v for k, v in tensors.items()}),
    ),
    Case("delora-zero-sharded", "llama:sharded", _peft("DeloraConfig", r=4, delora_lambda=2, target_modules=ATTN_MLP), **ZERO),
]

# VeRA (tests/test_vera.py: biases untouched, regenerated projections equal PEFT's, refusals)
FAMILY_CASES += [
    Case(
        "vera-saved-projections-llama",
        "llama",
        _peft("VeraConfig", r=8, target_modules=ATTN_MLP, save_projection=True),
        (None, "delta", "knob:vera_lambda_d"),
        build=_checked(lambda tensors: "base_model.vera_A" in tensors),
    ),
    Case(
        "vera-regenerated-qwen2-bias",
        "qwen2",
        _peft("VeraConfig", r=8, target_modules=ATTN_MLP, save_projection=False, projection_prng_key=7),
        (None, "delta", "knob:vera_lambda_b"),
    ),
    Case(
        "vera-regenerated-gpt2-conv1d",
        "gpt2",
        _peft("VeraConfig", r=8, target_modules=GPT2, fan_in_fan_out=True, save_projection=False, projection_prng_key=3),
        (None, "delta", "knob:vera_lambda_d"),
        build=_checked(lambda tensors: not any(k.startswith("base_model.vera_") for k in tensors)),
    ),
    Case("vera-zero-sharded", "llama:sharded", _peft("VeraConfig", r=8, target_modules=ATTN_MLP), **ZERO),
]

# IA3 (tests/test_ia3.py: which bias is scaled, power round trips, refusal)
FAMILY_CASES += [
    Case(
        "ia3-qwen2-bias",
        "qwen2",
        _peft("IA3Config", target_modules=["k_proj", "v_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"]),
        (None, "power", "knob:ia3_l", "delta"),
        around_one=("ia3_l",),
    ),
    # lm_head is a Linear on a model of Conv1D layers: PEFT saves fan_in_fan_out=False for the whole adapter.
    Case(
        "ia3-gpt2-conv1d-and-linear-head",
        "gpt2",
        _peft("IA3Config", target_modules=["c_attn", "mlp.c_proj", "lm_head"], feedforward_modules=["mlp.c_proj"]),
        (None, "power"),
        around_one=("ia3_l",),
    ),
    Case(
        "ia3-llama",
        "llama",
        _peft("IA3Config", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
        (None, "power"),
        around_one=("ia3_l",),
    ),
]


# RoAd (tests/test_road.py: power round trips, refusals; PEFT wraps no Conv1D)
def _road(variant: str):
    return _peft("RoadConfig", variant=variant, group_size=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def _road_alpha(module: str, value: float):
    def change(tensors: dict) -> dict:
        tensors[f"base_model.model.model.{module}.road_alpha"][0] = value
        return tensors

    return change


ROAD_VARIANTS = ("road_1", "road_2", "road_4")
ROAD = dict(around_one=("road_alpha",))
FAMILY_CASES += [
    *(Case(f"{v}-qwen2-bias", "qwen2", _road(v), (None, "power", "strength", "knob:road_alpha", "knob:road_theta", "delta"), **ROAD) for v in ROAD_VARIANTS),
    *(Case(f"{v}-llama", "llama", _road(v), (None, "power"), **ROAD) for v in ROAD_VARIANTS),
    # α < 0 is the rotation by θ + π with scale |α|: still a scaled rotation with real powers.
    Case("road_1-negative-alpha-qwen2", "qwen2", _road("road_1"), ("power",), coeffs=(-0.5, 0.5), build=_edited(_road_alpha("layers.0.self_attn.q_proj", -0.8)), **ROAD),
    # θ ≈ 0, so the block of pair (0, 4) is ≈ diag(α₀, α₄): a negative α₀ is a negative real eigenvalue. Fractional
    # powers are refused (tests/test_road.py), integer ones are fine.
    *(
        Case(f"{v}-negative-eigenvalue-qwen2", "qwen2", _road(v), ("power",), coeffs=(-1, 2), build=_edited(_road_alpha("layers.1.mlp.up_proj", -0.8)), **ROAD)
        for v in ("road_2", "road_4")
    ),
]


# AdaLoRA (tests/test_adalora.py: refusal, runtime restore)
def _adalora(**kwargs):
    return _peft("AdaLoraConfig", **{"init_r": 6, "target_r": 3, "lora_alpha": 8, "total_step": 10, **kwargs})


def _pruned_adalora(base: Path, folder: Path, case: Case) -> Path:
    """Train a few steps with update_and_allocate so PEFT masks and saves a truncated rank_pattern."""
    import json

    from peft import get_peft_model

    from conftest import TOKENS, load_base, perturb

    config = case.config()
    model = get_peft_model(load_base(base), config)
    perturb(model, case.scale)
    for step in range(1, config.total_step - config.tfinal + 1):
        model(TOKENS, labels=TOKENS).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    model.save_pretrained(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(saved, indent=2))
    kept = {sum(mask) for mask in saved["rank_pattern"].values()}
    assert kept - {0, config.init_r}, f"no layer was pruned to a partial rank: {saved['rank_pattern']}"
    return folder


FAMILY_CASES += [
    Case("adalora-llama", "llama", _adalora(target_modules=ATTN_MLP), (None, "delta", "knob:lora_E"), scale=0.2),
    Case("adalora-qwen2-bias", "qwen2", _adalora(target_modules=["q_proj", "v_proj", "o_proj"]), (None,), scale=0.2),
    Case("adalora-gpt2-conv1d", "gpt2", _adalora(target_modules=GPT2, fan_in_fan_out=True), (None,), scale=0.2),
    # Ranks pruned by PEFT's own rank allocator keep the init_r scale.
    *(
        Case(
            f"adalora-pruned-alpha{alpha}-llama",
            "llama",
            _adalora(lora_alpha=alpha, tinit=0, tfinal=1, total_step=4, target_modules=["q_proj", "v_proj", "down_proj"]),
            (None, "knob:scaling"),
            scale=0.2,
            scheme_coeffs=SCALING_SHORT,
            build=_pruned_adalora,
        )
        for alpha in (8, 0)
    ),
    Case("adalora-zero-qwen2", "qwen2", _adalora(target_modules=ATTN_MLP), **ZERO),
]

# LoHa and LoKr (tests/test_lycoris.py: refusals; PEFT rejects Conv1D for both, so no GPT-2 rows)
FAMILY_CASES += [
    Case("loha-llama", "llama", _peft("LoHaConfig", r=4, alpha=8, target_modules=ATTN_MLP), (None, "delta", "knob:hada_w1_a")),
    Case(
        "loha-patterns-qwen2-bias",
        "qwen2",
        _peft("LoHaConfig", r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
              rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"layers.0.self_attn.q_proj": 3, "v_proj": 16}),
        (None, "knob:scaling"),
        scheme_coeffs=SCALING_SHORT,
    ),
    Case("loha-zero-sharded", "llama:sharded", _peft("LoHaConfig", r=4, target_modules=ATTN_MLP), **ZERO),
    # r comes from the config, not from the shapes, when the factors are stored whole.
    Case(
        "lokr-whole-factors-patterns-llama",
        "llama",
        _peft("LoKrConfig", r=8, alpha=4, target_modules=ATTN_MLP, rank_pattern={"o_proj": 6, "layers.1.mlp.up_proj": 16},
              alpha_pattern={"layers.0.self_attn.q_proj": 12}),
        (None, "delta", "knob:lokr_w1"),
        build=_checked(lambda tensors: _suffixes(tensors) == {"lokr_w1", "lokr_w2"}),
    ),
    *(
        Case(
            f"lokr-decompose-both-{arch}",
            arch,
            _peft("LoKrConfig", r=2, alpha=6, decompose_both=True, target_modules=ATTN_MLP, rank_pattern={"k_proj": 1}),
            (None,),
            build=_checked(lambda tensors: _suffixes(tensors) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
        )
        for arch in ("llama", "qwen2")
    ),
    Case(
        "lokr-decompose-factor-mixed-qwen2-bias",
        "qwen2",
        _peft("LoKrConfig", r=3, alpha=5, decompose_both=True, decompose_factor=4, target_modules=ATTN_MLP),
        (None, "knob:scaling"),
        scheme_coeffs=SCALING_SHORT,
        build=_checked(lambda tensors: {"lokr_w1", "lokr_w2_a"} <= _suffixes(tensors)),
    ),
    Case("lokr-zero-sharded", "llama:sharded", _peft("LoKrConfig", r=2, decompose_both=True, target_modules=ATTN_MLP), **ZERO),
]


# OFT (tests/test_oft.py: power round trips, the Cayley maps against references, refusals)
def _oft(**kwargs):
    return _peft("OFTConfig", oft_block_size=16, **{"target_modules": ATTN_MLP, **kwargs})


OFT_Q = "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"


def _quarter_turn(tensors: dict) -> dict:
    tensors[OFT_Q][0] = 0.0
    tensors[OFT_Q][0, 0] = 1.0  # Q = [[0, 1], [−1, 0]] in the first plane: R turns it by exactly π/2
    return tensors


FAMILY_CASES += [
    Case("oft-neumann-llama", "llama", _oft(), (None, "power", "delta", "knob:oft_R")),
    Case("oft-exact-cayley-qwen2-bias", "qwen2", _oft(use_cayley_neumann=False), (None, "power")),
    *(
        Case(f"oft-block-share-{'neumann' if neumann else 'exact'}-llama", "llama", _oft(block_share=True, use_cayley_neumann=neumann), (None, "power"),
             build=_checked(lambda tensors: tensors[OFT_Q].shape[0] == 1))
        for neumann in (True, False)
    ),
    # eps chosen so that the trained rows (‖Q_k‖_F ≈ 1.5) lie well outside the ball: the projection matters.
    Case("oft-coft-llama", "llama", _oft(coft=True, eps=2.0, target_modules=["q_proj", "v_proj"]), (None, "power")),
    *(Case(f"oft-embedding-{arch}", arch, _oft(target_modules=["embed_tokens", "q_proj"]), (None, "power")) for arch in ("llama", "llama_tied")),
    # Exact Cayley, a block turning a plane by π/2: R² has eigenvalue −1, no Q gives it, the runtime uses a hook.
    Case("oft-quarter-turn-power-llama", "llama", _oft(use_cayley_neumann=False, target_modules=["q_proj"]), ("power",), coeffs=(2, -2), build=_edited(_quarter_turn)),
    Case("oft-zero-sharded", "llama:sharded", _oft(), ("linear", "power"), coeffs=(0,)),
]

# BOFT (tests/test_boft.py: power round trip, refusals, N > 1 against a dense reference)
BOFT = dict(around_one=("boft_s",))
FAMILY_CASES += [
    Case("boft-llama", "llama", _peft("BOFTConfig", boft_block_size=4, target_modules=ATTN_MLP), (None, "power", "delta", "knob:boft_R"), **BOFT),
    Case("boft-qwen2-bias", "qwen2", _peft("BOFTConfig", boft_block_size=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]), (None, "power"), **BOFT),
    Case("boft-zero-sharded", "llama:sharded", _peft("BOFTConfig", boft_block_size=4, target_modules=ATTN_MLP), ("linear", "power"), coeffs=(0,), **BOFT),
]

# HRA (tests/test_hra.py: power round trips, refusals). Fractional powers exist only for even r without
# Gram–Schmidt; with apply_GS, H² = I: even coeffs would only give the base again and are refused.
HRA_INTEGER = (-1, 0, 1, 2)
HRA_QWEN2 = ["q_proj", "v_proj", "down_proj"]
FAMILY_CASES += [
    Case("hra-even-llama", "llama", _peft("HRAConfig", r=4, target_modules=ATTN_MLP), (None, "power")),  # default scheme: delta
    Case("hra-odd-llama", "llama", _peft("HRAConfig", r=3, target_modules=ATTN_MLP), (None, "power"), scheme_coeffs={"power": HRA_INTEGER}),
    Case("hra-gram-schmidt-llama", "llama", _peft("HRAConfig", r=4, apply_GS=True, target_modules=ATTN_MLP), (None, "power"), scheme_coeffs={"power": (-1, 0, 1)}),
    Case("hra-even-qwen2-bias", "qwen2", _peft("HRAConfig", r=4, target_modules=HRA_QWEN2), ("power",)),
    Case("hra-odd-qwen2-bias", "qwen2", _peft("HRAConfig", r=3, target_modules=HRA_QWEN2), ("power",), coeffs=HRA_INTEGER),
    Case("hra-zero-sharded", "llama:sharded", _peft("HRAConfig", r=4, target_modules=ATTN_MLP), ("delta", "power"), coeffs=(0,)),
]


# RandLoRA (tests/test_randlora.py: regenerated bases equal PEFT's, refusals). k_proj/v_proj/down_proj have
# in > out (the transposed product), q/o are square, gate/up in < out.
def _randlora(**kwargs):
    # α = r keeps the (large by default) update moderate, so fp32 logits stay comparable at 1e-4.
    return _peft("RandLoraConfig", **{"r": 8, "randlora_alpha": 8, **kwargs})


FAMILY_CASES += [
    Case(
        "randlora-saved-bases-llama",
        "llama",
        _randlora(target_modules=ATTN_MLP),
        (None, "delta", "knob:scaling", "knob:randlora_gamma"),
        scale=0.02,
        build=_checked(lambda tensors: "base_model.randlora_A" in tensors and any(k.endswith("q_proj.randlora_A") for k in tensors)),
    ),
    Case(
        "randlora-regenerated-qwen2-bias",
        "qwen2",
        _randlora(target_modules=ATTN_MLP, save_projection=False, projection_prng_key=5),
        (None,),
        scale=0.02,
        build=_checked(lambda tensors: not any("randlora_A" in k for k in tensors)),
    ),
    *(
        Case(f"randlora-{'saved' if saved else 'regenerated'}-gpt2-conv1d", "gpt2", _randlora(target_modules=GPT2, fan_in_fan_out=True, save_projection=saved), (None,), scale=0.02)
        for saved in (True, False)
    ),
    Case("randlora-zero-sharded", "llama:sharded", _randlora(target_modules=ATTN_MLP), **ZERO),
]


# VB-LoRA (tests/test_vblora.py: the quadratic bank knob, the runtime's branch scale, refusals)
def _vblora(**kwargs):
    return _peft("VBLoRAConfig", **{"r": 4, "vector_length": 16, "num_vectors": 32, "topk": 2, **kwargs})


FAMILY_CASES += [
    Case("vblora-llama", "llama", _vblora(target_modules=ATTN_MLP), (None, "delta", "knob:vblora_vector_bank"), scale=1.0),
    *(
        Case(
            f"vblora-topk-only-{arch}",
            arch,
            _vblora(target_modules=ATTN_MLP, save_only_topk_weights=True, topk=3),
            (None,),
            scale=1.0,
            build=_checked(lambda tensors: any(k.endswith("_topk_indices") for k in tensors) and not any(k.endswith("vblora_logits_A") for k in tensors)),
        )
        for arch in ("llama", "qwen2")
    ),
    Case("vblora-gpt2-conv1d", "gpt2", _vblora(target_modules=GPT2, fan_in_fan_out=True), scale=1.0),
    Case("vblora-zero-sharded", "llama:sharded", _vblora(target_modules=ATTN_MLP), **ZERO, scale=1.0),
]

# FourierFT: positions re-derived from the seed (tests/test_fourierft.py: refusal)
FAMILY_CASES += [
    Case("fourierft-llama", "llama", _peft("FourierFTConfig", n_frequency=200, scaling=100.0, target_modules=ATTN_MLP), (None, "delta", "knob:fourierft_spectrum")),
    Case(
        "fourierft-pattern-seed-qwen2-bias",
        "qwen2",
        _peft("FourierFTConfig", n_frequency=300, scaling=50.0, random_loc_seed=1234, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
              n_frequency_pattern={"k_proj": 100, "layers.1.mlp.down_proj": 2000}),
        (None, "knob:scaling"),
        scheme_coeffs=SCALING_SHORT,
    ),
    Case("fourierft-gpt2-conv1d", "gpt2", _peft("FourierFTConfig", n_frequency=500, target_modules=GPT2, fan_in_fan_out=True), (None,)),
    Case("fourierft-zero-gpt2", "gpt2", _peft("FourierFTConfig", n_frequency=100, target_modules=["c_attn", "c_fc"]), **ZERO),
]

# C3A (tests/test_c3a.py: the circulant blocks against PEFT's FFT delta, refusal)
FAMILY_CASES += [
    Case("c3a-llama", "llama", _peft("C3AConfig", block_size=16, target_modules=ATTN_MLP), (None, "delta", "knob:c3a_kernel"), scale=1.0),
    Case("c3a-block-size-pattern-qwen2-bias", "qwen2", _peft("C3AConfig", block_size=32, block_size_pattern={"k_proj": 16}, target_modules=ATTN_MLP), (None,), scale=1.0),
    Case("c3a-zero-sharded", "llama:sharded", _peft("C3AConfig", block_size=16, target_modules=ATTN_MLP), **ZERO),
]


# SHiRA (tests/test_shira.py: refusals)
def _float_indices(tensors: dict) -> dict:
    """Indices saved as float32 (PEFT does so on Windows) are positions all the same."""
    import torch

    assert all(v.dtype == torch.int32 for k, v in tensors.items() if k.endswith("shira_indices"))
    return {k: v.float() if k.endswith("shira_indices") else v for k, v in tensors.items()}


FAMILY_CASES += [
    Case("shira-llama", "llama", _peft("ShiraConfig", r=2, target_modules=ATTN_MLP), (None, "delta", "knob:scaling", "knob:shira_weight"), scale=0.3),
    Case("shira-float-indices-qwen2-bias", "qwen2", _peft("ShiraConfig", r=2, target_modules=ATTN_MLP), (None,), scale=0.3, build=_edited(_float_indices)),
    Case("shira-zero-sharded", "llama:sharded", _peft("ShiraConfig", r=2, target_modules=ATTN_MLP), **ZERO),
]

# MiSS (tests/test_miss.py: old Bone checkpoints, refusals)
MISS_VARIANTS = {
    "default": {"r": 8},
    "padded": {"r": 24},  # 64 % 24 and 128 % 24 ≠ 0: inputs are zero-padded to a multiple of r
    "mini": {"r": 8, "init_weights": "mini", "mini_r": 16},
    "bat": {"r": 8, "init_weights": "bat"},  # ΔW depends on W
}
FAMILY_CASES += [
    *(Case(f"miss-{v}-llama", "llama", _peft("MissConfig", target_modules=ATTN_MLP, **MISS_VARIANTS[v]), (None, "delta", "knob:miss_block"), scale=0.05) for v in MISS_VARIANTS),
    *(Case(f"miss-{v}-qwen2-bias", "qwen2", _peft("MissConfig", target_modules=ATTN_MLP, **MISS_VARIANTS[v]), (None,), scale=0.05) for v in ("padded", "bat")),
    Case("miss-bat-zero-sharded", "llama:sharded", _peft("MissConfig", target_modules=ATTN_MLP, **MISS_VARIANTS["bat"]), **ZERO, scale=0.05),
]

# LN Tuning: trained copies of norms and of a Linear (tests/test_ln_tuning.py: which tensors change, refusal, restore)
FAMILY_CASES += [
    Case("ln-tuning-rmsnorm-llama", "llama", _peft("LNTuningConfig", target_modules=["input_layernorm", "post_attention_layernorm", "norm"]), (None, "delta", "knob:ln_tuning_layers")),
    Case("ln-tuning-layernorm-bias-gpt2", "gpt2", _peft("LNTuningConfig", target_modules=["ln_1", "ln_2", "ln_f"])),
    Case("ln-tuning-linear-qwen2-bias", "qwen2", _peft("LNTuningConfig", target_modules=["q_proj"]), (None,), scale=0.02),
    Case("ln-tuning-zero-gpt2", "gpt2", _peft("LNTuningConfig", target_modules=["ln_1", "ln_f"]), **ZERO),
]

# TrainableTokens, alone and beside a LoRA (tests/test_trainable_tokens.py: tying kept or undone, restore, refusal)
TOKEN_IDS = [1, 5, 9, 42, 100]  # all occur in conftest.TOKENS
FAMILY_CASES += [
    *(Case(f"trainable-tokens-{arch}", arch, _tokens(token_indices=TOKEN_IDS), (None, "delta", "knob:trainable_tokens_delta")) for arch in ("llama", "llama_tied")),
    *(
        Case(f"lora-token-rows-{arch}", arch, _lora(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKEN_IDS), (None, "delta", "knob:scaling"))
        for arch in ("llama", "llama_tied", "gemma")
    ),
    Case(
        "lora-token-rows-tied-separate-head",
        "llama_tied",
        _lora(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKEN_IDS, "lm_head": [3, 42, 77]}),
        (None,),
    ),
]

# Poly: one task's skill mix baked in (tests/test_poly.py: the other tasks, restore, task_id refusals). Large
# noise on the router logits too, so that the tasks mix their skills differently.
POLY_TASK = 1
FAMILY_CASES += [
    Case(
        "poly-task1-llama",
        "llama",
        _peft("PolyConfig", task_type="CAUSAL_LM", r=4, n_tasks=3, n_skills=3, n_splits=2, target_modules=["q_proj", "v_proj", "down_proj"]),
        (None, "delta", "knob:poly_lora_A", "knob:poly_router"),
        scale=0.5,
        options={"task_id": POLY_TASK},
    ),
]


# ---- architectures (real-world checkpoints as transformers saves them) -------------------------------
# Module paths ≠ stored names: PEFT saves model.language_model.…, the checkpoint stores model.… or
# language_model.model.… (weightsteer.names replays transformers' conversion mapping). The table compares text-only
# logits; tests/test_names.py compares every stored tensor (vision tower, projector) with PEFT's own merge.
SHORT = (-1, 0, 0.5, 1)
VLM_CASES = [
    Case("vlm-qwen2_vl", "qwen2_vl", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "qkv", "fc1", "mlp.0"]), coeffs=SHORT),
    Case("vlm-qwen2_5_vl", "qwen2_5_vl", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "qkv", "mlp.0"]), coeffs=SHORT),
    Case("vlm-qwen3_vl", "qwen3_vl", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "qkv", "linear_fc1"]), coeffs=SHORT),
    Case(
        "vlm-gemma3",
        "gemma3",
        _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "fc1", "out_proj"],
              target_parameters=["multi_modal_projector.mm_input_projection_weight"]),
        coeffs=SHORT,
    ),
    Case("vlm-llava", "llava", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "fc1", "linear_1", "linear_2", "lm_head"]), coeffs=SHORT),
    Case("vlm-mistral3", "mistral3", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "linear_1", "merging_layer"]), coeffs=SHORT),
]
# MoE experts: transformers 5 fuses them into 3-D parameters that PEFT targets with target_parameters (ParamWrapper);
# the checkpoint stores one tensor per expert. PEFT 0.21 rewrites Mixtral's ["w1", "w2", "w3", "gate"] and Qwen3-MoE's
# "all-linear" into target_parameters itself.
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MOE_CASES = [
    Case("moe-mixtral-w123", "mixtral", _lora(r=2, lora_alpha=4, target_modules=["q_proj", "w1", "w2", "w3", "gate"]), coeffs=SHORT),
    Case("moe-qwen3_moe-all-linear", "qwen3_moe", _lora(r=2, lora_alpha=4, target_modules="all-linear"), coeffs=SHORT),
    Case("moe-qwen3_moe-router", "qwen3_moe", _lora(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.gate.weight"]), coeffs=SHORT),
    Case(
        "moe-qwen2_moe-shared",
        "qwen2_moe",
        _lora(r=2, lora_alpha=4, target_modules=["q_proj", "shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert_gate"],
              target_parameters=[*EXPERTS, "mlp.gate.weight"]),
        coeffs=SHORT,
    ),
    Case(
        "moe-gpt_oss",
        "gpt_oss",
        # three ParamWrappers nested on one experts module, one of them on a 2-D bias; gate_up_proj is stored fused
        # and interleaved as the model holds it, (experts, in, out) (`is_transposed`)
        _lora(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=True,
              target_parameters=[*EXPERTS, "mlp.experts.gate_up_proj_bias", "mlp.router.weight"]),
        coeffs=SHORT,
    ),
    Case("moe-deepseek_v3", "deepseek_v3", _lora(r=2, lora_alpha=4, target_modules=["q_b_proj", "kv_b_proj"], target_parameters=EXPERTS), coeffs=SHORT),
]
# Embeddings, heads and tying per architecture, from PEFT's own test matrix (tied and untied heads, token rows on
# the embedding and the head, ensure_weight_tying), and model classes other than causal LMs.
MODEL_QUICK = dict(schemes=(None,), coeffs=(-1, 0, 0.5, 1))
NEOX = ["query_key_value"]
HEAD_CASES = [
    # GPT-NeoX stores its head as embed_out (transformers names the module lm_head).
    Case("neox-head-modules-to-save", "gpt_neox", _lora(r=2, target_modules=NEOX, modules_to_save=["lm_head"]), **MODEL_QUICK),
    Case("neox-head-lora", "gpt_neox", _lora(r=2, target_modules=[*NEOX, "lm_head"]), **MODEL_QUICK),
    Case("neox-tokens-embed-and-head", "gpt_neox", _lora(r=2, target_modules=NEOX, trainable_token_indices={"embed_in": [1, 5, 9], "lm_head": [3, 42]}), **MODEL_QUICK),
    Case("neox-tied-tokens-on-head", "gpt_neox_tied", _tokens(target_modules=["lm_head"], token_indices=[1, 5, 9]), **MODEL_QUICK),
    # ensure_weight_tying ties only modules named embed_tokens / lm_head: GPT-2's wte and Falcon's word_embeddings untie.
    Case("gpt2-wte-modules-to-save-tying", "gpt2", _lora(r=2, target_modules=["c_attn"], modules_to_save=["wte"], ensure_weight_tying=True), **MODEL_QUICK),
    Case("falcon-embedding-lora-tying", "falcon", _lora(r=2, target_modules=[*NEOX, "word_embeddings"], ensure_weight_tying=True), **MODEL_QUICK),
    # PEFT moves modules_to_save=["lm_head"] to `transformer.wte` and saves both copies, but on loading it ties
    # nothing (wte is not a name it knows) and loads the head's copy into the shared base weight: its live model
    # then has no base left to scale from (it runs the trained copy at every c), so only c = 1 has an oracle.
    Case("gpt2-head-modules-to-save-tying", "gpt2", _lora(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"], ensure_weight_tying=True), schemes=(None,), coeffs=(1,)),
    Case("gpt2-head-lora-tying", "gpt2", _lora(r=2, target_modules=["c_attn", "lm_head"], ensure_weight_tying=True), **MODEL_QUICK),
    Case("opt-tokens-same-rows", "opt", _lora(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9], "lm_head": [1, 5, 9]}), **MODEL_QUICK),
    # One shared modules_to_save copy behind the embedding and the head: scaled interpolates it once.
    Case("llama-tied-embedding-modules-to-save-tying", "llama_tied", _lora(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True), **MODEL_QUICK),
    # A tied VLM (Gemma 3 loads as Gemma3ForConditionalGeneration) with a LoRA on the head: untied where each version reads it.
    Case("gemma3-vlm-head-lora", "gemma3", _lora(r=2, target_modules=["lm_head", "q_proj"]), **MODEL_QUICK),
    # Encoder-decoders: T5's head and embed_tokens are tied to `shared`; BART's head to model.shared.
    Case("t5-head-and-embed-tokens-lora", "t5", _lora(r=2, target_modules=["q", "v", "lm_head", "embed_tokens"]), **MODEL_QUICK),
    Case("bart-head-lora", "bart", _lora(r=2, target_modules=["q_proj", "lm_head"]), **MODEL_QUICK),
    # Other model classes: a sequence classifier (its head stored whole) and a masked LM with a tied decoder.
    Case("bert-classifier", "bert_cls", _lora(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), **MODEL_QUICK),
    Case("modernbert-masked-lm", "modernbert", _lora(r=2, target_modules=["Wqkv", "Wo"]), **MODEL_QUICK),
]
MODEL_CASES: list[Case] = [*VLM_CASES, *MOE_CASES, *HEAD_CASES]

CASES = [*TYPE_CASES, *FAMILY_CASES, *MODEL_CASES]
ROWS = {case.id: case for case in CASES}
