"""`sweep`: measure what each coeff does to the model, and find the coeff that spends a KL budget.

For each coeff c and each prompt, the model with the adapter at c (the runtime twin `scaled`) decodes
greedily up to `tokens` new tokens (stopping after an end-of-sequence token). At every generated position t,
the next-token distributions on the same prefix (prompt + steered tokens before t) come from the model at c
(p_c) and from the base, adapter disabled (p_0), over the full vocabulary in float32:

    KL_t = Σ_v p_c(v) · (log p_c(v) − log p_0(v))        KL(steered ‖ base), natural log, clamped at 0

Per coeff, over all positions of all prompts: kl_mean, kl_p50, kl_p95, kl_max (linear interpolation, as
torch.quantile); nll_base = mean −log p_0(token) of the generated tokens; distinct2 = distinct bigrams / all
bigrams of the generated token sequences; with pairs, margin = mean of log p_c(positive | prompt) −
log p_c(negative | prompt), each the sum of the completion's token log-probs.

Speed: prompts run in left-padded batches; the rollout decodes with the KV cache; p_c and p_0 come from one
teacher-forced forward each over the whole rollout, on top of the prompt's cached keys and values (the base's
prompt cache is computed once per batch for every coeff). Both sides are computed the same way, so at c = 0
(where the scheme gives the base) every KL is exactly 0.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .adapters import load_adapter
from .calibration import KLTarget, finite
from .errors import BaseModelError, SweepError
from .resolve import resolve
from .runtime import scaled

PathLike = str | os.PathLike

DEFAULT_COEFFS = (-2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
DEFAULT_TOKENS = 32
DEFAULT_BATCH_SIZE = 16
SAMPLES = 3  # generations kept per point, of the first prompts
TOLERANCE = 0.02  # c* is accepted when |kl_p95(c*) − K| ≤ 2 % of K
MAX_COEFF = 8.0  # the search for c* extends the sweep up to |c| = 8
MAX_REFINEMENTS = 12  # measurements per pole once c* is bracketed
SIGNIFICANT_DIGITS = 3  # c* candidates are rounded, so merged folders and cards carry short coeffs
OUTPUT_FILES = ("sweep.json", "sweep.png", "report.md")
PLOT_HINT = "pip install 'weightsteer[plot]'  (or: pip install matplotlib)"


@dataclass(frozen=True)
class Pair:
    """A prompt with a completion the adapter should favour (positive) and one it should not (negative)."""

    prompt: str
    positive: str
    negative: str


@dataclass
class SweepPoint:
    """What one coeff does, measured on every prompt."""

    coeff: float
    kl_mean: float
    kl_p50: float
    kl_p95: float
    kl_max: float
    nll_base: float
    distinct2: float | None  # None when no generation has two tokens
    margin: float | None  # None without pairs
    samples: list[str] = field(default_factory=list)

    def metrics(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "samples"}


@dataclass
class Calibration:
    """The coeff found for one KL budget (None, with the reason, when it cannot be reached)."""

    target: KLTarget
    coeff: float | None
    reason: str | None
    point: SweepPoint | None
    prompts: int
    prompts_sha256: str
    tokens: int
    scheme: str

    def to_dict(self) -> dict:
        """The `calibration` record of a merged checkpoint's weightsteer.json."""
        return {
            "target_kl": self.target.kl,
            "metric": "kl_p95",
            "pole": "positive" if self.target.sign > 0 else "negative",
            "coeff": self.coeff,
            "point": self.point.metrics() if self.point else None,
            "prompts": self.prompts,
            "prompts_sha256": self.prompts_sha256,
            "tokens": self.tokens,
            "scheme": self.scheme,
        }


@dataclass
class SweepReport:
    """Every measured coeff (sorted), and c* per pole when a KL budget was given."""

    adapter: str
    base: str
    scheme: str
    tokens: int
    prompts: int
    prompts_sha256: str
    target_kl: float | None
    c_pos: float | None
    c_neg: float | None
    c_pos_reason: str | None
    c_neg_reason: str | None
    points: list[SweepPoint]
    prompt_texts: list[str] = field(default_factory=list)  # of the samples, for report.md

    def point(self, coeff: float) -> SweepPoint:
        found = [p for p in self.points if p.coeff == coeff]
        if not found:
            raise KeyError(f"no point at coeff {coeff:g}; measured: {', '.join(f'{p.coeff:g}' for p in self.points)}")
        return found[0]

    def to_dict(self) -> dict:
        """The sweep.json object."""
        keys = ("adapter", "base", "scheme", "tokens", "prompts", "prompts_sha256", "target_kl")
        data = {k: getattr(self, k) for k in keys}
        data |= {k: getattr(self, k) for k in ("c_pos", "c_neg", "c_pos_reason", "c_neg_reason")}
        return data | {"points": [asdict(p) for p in self.points]}

    def table(self, sample_width: int = 48) -> str:
        """The points as a fixed-width text table, with the start of the first sample."""
        header = f"{'coeff':>7} {'kl_mean':>8} {'kl_p50':>8} {'kl_p95':>8} {'kl_max':>8} {'nll_base':>8} {'dist2':>6}"
        header += f" {'margin':>8}" if self._has_margin else ""
        rows = [header + "  sample"]
        for p in self.points:
            row = f"{p.coeff:>7g} {p.kl_mean:>8.3g} {p.kl_p50:>8.3g} {p.kl_p95:>8.3g} {p.kl_max:>8.3g} {p.nll_base:>8.3g}"
            row += f" {_fmt(p.distinct2, '6.2f')}" + (f" {_fmt(p.margin, '8.3g')}" if self._has_margin else "")
            sample = " ".join(p.samples[0].split()) if p.samples else ""
            rows.append(f"{row}  {sample[:sample_width]}{self._mark(p.coeff)}")
        return "\n".join(rows + self._calibration_lines())

    @property
    def _has_margin(self) -> bool:
        return any(p.margin is not None for p in self.points)

    def _role(self, coeff: float) -> str | None:
        return "c_pos" if coeff == self.c_pos else "c_neg" if coeff == self.c_neg else None

    def _mark(self, coeff: float) -> str:
        return f"  ← {self._role(coeff)}" if self._role(coeff) else ""

    def _calibration_lines(self) -> list[str]:
        if self.target_kl is None:
            return []
        lines = []
        for name, c, reason in (("c_pos", self.c_pos, self.c_pos_reason), ("c_neg", self.c_neg, self.c_neg_reason)):
            if c is not None:
                lines.append(f"{name} = {c:g}: kl_p95 {self.point(c).kl_p95:.3g} nat (target {self.target_kl:g})")
            else:
                lines.append(f"{name}: none ({reason})")
        return lines

    def markdown(self) -> str:
        """report.md: the table of points, the plot, and the samples of every coeff side by side."""
        lines = [
            f"# Sweep of `{self.adapter}`",
            "",
            f"Base `{self.base}`, scheme `{self.scheme}`; greedy rollouts of {self.tokens} tokens on {self.prompts} "
            f"prompts. KL(steered ‖ base) per generated position, in nats.",
            "",
            "| coeff | kl_mean | kl_p50 | kl_p95 | kl_max | nll_base | distinct2 |" + (" margin |" if self._has_margin else ""),
            "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if self._has_margin else ""),
        ]
        for p in self.points:
            cells = [f"{p.coeff:g}" + (f" ({self._role(p.coeff)})" if self._role(p.coeff) else "")]
            cells += [f"{v:.3g}" for v in (p.kl_mean, p.kl_p50, p.kl_p95, p.kl_max, p.nll_base)]
            cells += [_fmt(p.distinct2, ".2f").strip()] + ([_fmt(p.margin, ".3g").strip()] if self._has_margin else [])
            lines.append("| " + " | ".join(cells) + " |")
        calibration = [f"- {line}" for line in self._calibration_lines()]
        lines += ["", *calibration, *([""] if calibration else []), "![sweep](sweep.png)", ""]
        for i, prompt in enumerate(self.prompt_texts):
            lines += [f"## Prompt {i + 1}: {_cell(prompt)}", "", "| coeff | kl_p95 | generation |", "|---:|---:|---|"]
            lines += [f"| {p.coeff:g} | {p.kl_p95:.3g} | {_cell(p.samples[i])} |" for p in self.points if i < len(p.samples)]
            lines.append("")
        return "\n".join(lines)

    def plot(self, path: PathLike) -> Path:
        """sweep.png: kl_p95 (log scale) and, with pairs, margin against coeff; c* and the budget marked."""
        plt = _pyplot()
        panels = 2 if self._has_margin else 1
        figure, axes = plt.subplots(panels, 1, figsize=(7, 3.2 * panels + 0.6), sharex=True, squeeze=False)
        kl_axis = axes[0][0]
        shown = [p for p in self.points if p.kl_p95 > 0]  # log scale: c = 0 (KL 0) is not drawn
        kl_axis.plot([p.coeff for p in shown], [p.kl_p95 for p in shown], "o-", color="C0", label="kl_p95")
        means = [p for p in self.points if p.kl_mean > 0]
        kl_axis.plot([p.coeff for p in means], [p.kl_mean for p in means], ".:", color="C0", alpha=0.5, label="kl_mean")
        kl_axis.set_yscale("log")
        kl_axis.set_ylabel("KL(steered ‖ base), nats")
        if self.target_kl is not None:
            kl_axis.axhline(self.target_kl, color="gray", lw=0.8, ls="--", label=f"budget {self.target_kl:g} nat")
        if self._has_margin:
            margin_axis = axes[1][0]
            points = [p for p in self.points if p.margin is not None]
            margin_axis.plot([p.coeff for p in points], [p.margin for p in points], "o-", color="C2")
            margin_axis.axhline(0, color="gray", lw=0.8)
            margin_axis.set_ylabel("margin, log p(pos) − log p(neg)")
        for name, c in (("c_pos", self.c_pos), ("c_neg", self.c_neg)):
            if c is not None:
                for (axis,) in axes:
                    axis.axvline(c, color="C3", lw=1.2, ls="--")
                kl_axis.annotate(f"{name} = {c:g}", (c, self.target_kl), textcoords="offset points", xytext=(4, 6), color="C3")
        for (axis,) in axes:
            axis.grid(True, which="both", alpha=0.3)
        axes[-1][0].set_xlabel("coeff")
        kl_axis.legend(loc="best", fontsize="small")
        kl_axis.set_title(f"{Path(self.adapter).name}: {self.prompts} prompts × {self.tokens} tokens, scheme {self.scheme}")
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def write(self, folder: PathLike, *, plot: bool = True) -> list[Path]:
        """Write sweep.json, report.md and (plot=True) sweep.png into `folder`; refuse a folder a sweep did not write."""
        folder = check_sweep_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "sweep.json", folder / "report.md"]
        written[0].write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        written[1].write_text(self.markdown())
        if plot:
            written.append(self.plot(folder / "sweep.png"))
        return written


def check_sweep_folder(folder: PathLike) -> Path:
    """The folder, if a sweep may write into it: new, empty, or holding only a previous sweep's files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SweepError(f"{folder} is a file; choose another output folder.")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in OUTPUT_FILES) if folder.is_dir() else []
    if foreign:
        raise SweepError(
            f"{folder} holds files a sweep did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "choose another output folder."
        )
    return folder


def default_prompts() -> list[str]:
    """The built-in neutral chat prompts (shipped as weightsteer/data/chat_prompts.txt)."""
    text = resources.files("weightsteer").joinpath("data/chat_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(path: PathLike) -> list[str]:
    """Prompts from a file: one a line, or JSONL with a "prompt" field."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise SweepError(f"{path} holds no prompt; write one prompt a line, or JSONL with a \"prompt\" field.")
    if not lines[0][1].lstrip().startswith("{"):
        return [line.strip() for _, line in lines]
    return [_json_fields(path, n, line, ("prompt",))[0] for n, line in lines]


def read_pairs(path: PathLike) -> list[Pair]:
    """Pairs from a JSONL file with "prompt", "positive" and "negative" fields."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise SweepError(f"{path} holds no pair; write JSONL lines with \"prompt\", \"positive\" and \"negative\".")
    return [Pair(*_json_fields(path, n, line, ("prompt", "positive", "negative"))) for n, line in lines]


def _json_fields(path: PathLike, number: int, line: str, names: tuple[str, ...]) -> list[str]:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise SweepError(f"{path}, line {number}: not valid JSON ({e}).") from None
    missing = [n for n in names if not isinstance(record, dict) or not isinstance(record.get(n), str)]
    if missing:
        raise SweepError(f"{path}, line {number}: needs string field(s) {', '.join(repr(n) for n in missing)}.")
    return [record[n] for n in names]


def _pair(value: Pair | Mapping[str, str]) -> Pair:
    if isinstance(value, Pair):
        return value
    if not isinstance(value, Mapping) or not all(isinstance(value.get(k), str) for k in ("prompt", "positive", "negative")):
        raise SweepError(f"A pair needs string fields prompt, positive and negative; got {value!r}.")
    return Pair(value["prompt"], value["positive"], value["negative"])


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompts as a JSON list (UTF-8, no ASCII escapes): identifies what a calibration measured."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def sweep(
    adapter: PathLike,
    *,
    coeffs: Iterable[float] = DEFAULT_COEFFS,
    prompts: Sequence[str] | None = None,
    tokens: int = DEFAULT_TOKENS,
    pairs: Sequence[Pair | Mapping[str, str]] | None = None,
    target_kl: float | None = None,
    base: PathLike | None = None,
    scheme: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chat_template: bool = True,
    task_id: int | None = None,
    progress: bool = False,
) -> SweepReport:
    """Measure the adapter at every coeff (see the module docstring for exactly what), without writing a checkpoint.

    prompts default to the built-in neutral chat prompts; pairs ({"prompt", "positive", "negative"}) add the
    margin. target_kl (nats) also finds c_pos / c_neg with kl_p95 within 2 % of it, extending past the sweep up
    to |c| = 8; their points join `points`. device defaults to cuda when available; dtype to float32 on the CPU
    and the base's own dtype elsewhere. Returns a SweepReport (`.write(folder)`, `.plot(path)`, `.to_dict()`).
    """
    values = sorted({finite(c) for c in coeffs})
    if not values:
        raise SweepError("Give at least one coeff.")
    if target_kl is not None and not (math.isfinite(target_kl) and target_kl > 0):
        raise SweepError(f"target_kl must be a positive number of nats, got {target_kl}.")
    session = _Session.open(adapter, base, scheme, device, dtype, task_id, prompts, pairs, tokens, batch_size, chat_template)
    measured = session.measure(values, progress, "sweep")
    found = {sign: (None, None) for sign in (1, -1)}
    if target_kl is not None:
        for sign in (1, -1):
            found[sign] = session.search(KLTarget(target_kl, sign), measured, progress)
    chosen = set(values) | {c for c, _ in found.values() if c is not None}
    return SweepReport(
        adapter=str(adapter),
        base=session.base_ref,
        scheme=session.scheme.name,
        tokens=tokens,
        prompts=len(session.prompts),
        prompts_sha256=prompts_digest(session.prompts),
        target_kl=target_kl,
        c_pos=found[1][0],
        c_neg=found[-1][0],
        c_pos_reason=found[1][1],
        c_neg_reason=found[-1][1],
        points=[measured[c] for c in sorted(chosen)],
        prompt_texts=session.prompts[:SAMPLES],
    )


def calibrate(
    adapter: PathLike,
    targets: Sequence[KLTarget],
    *,
    prompts: Sequence[str] | None = None,
    tokens: int = DEFAULT_TOKENS,
    base: PathLike | None = None,
    scheme: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chat_template: bool = True,
    task_id: int | None = None,
    progress: bool = False,
) -> list[Calibration]:
    """Find the coeff of each KL budget (as `sweep(target_kl=...)` does, without a sweep first), one model load."""
    session = _Session.open(adapter, base, scheme, device, dtype, task_id, prompts, None, tokens, batch_size, chat_template)
    measured: dict[float, SweepPoint] = {}
    found = []
    for target in targets:
        coeff, reason = session.search(target, measured, progress)
        point = measured[coeff] if coeff is not None else None
        info = dict(prompts=len(session.prompts), prompts_sha256=prompts_digest(session.prompts), tokens=tokens)
        found.append(Calibration(target, coeff, reason, point, scheme=session.scheme.name, **info))
    return found


# ---- measurement -----------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Prompts as a left-padded batch, and the base's prompt cache and next-token log-probs (shared by all coeffs)."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    first: int  # index of its first prompt
    base_cache: object = None
    base_first: torch.Tensor | None = None  # log p_0 of the first generated token


@dataclass
class _Tally:
    """One coeff's running totals over the batches."""

    kl: list[torch.Tensor] = field(default_factory=list)
    nll: list[torch.Tensor] = field(default_factory=list)
    sequences: list[list[int]] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)  # log p_c of each pair's positive, then its negative

    def point(self, coeff: float, decode: Callable[[list[int]], str], with_margin: bool) -> SweepPoint:
        kl = torch.cat(self.kl).double()
        p50, p95 = torch.quantile(kl, torch.tensor([0.5, 0.95], dtype=torch.float64)).tolist()
        bigrams = [tuple(s[i : i + 2]) for s in self.sequences for i in range(len(s) - 1)]
        return SweepPoint(
            coeff=coeff,
            kl_mean=float(kl.mean()),
            kl_p50=p50,
            kl_p95=p95,
            kl_max=float(kl.max()),
            nll_base=float(torch.cat(self.nll).double().mean()),
            distinct2=len(set(bigrams)) / len(bigrams) if bigrams else None,
            margin=_mean([pos - neg for pos, neg in zip(self.completions[0::2], self.completions[1::2])]) if with_margin else None,
            samples=[decode(s) for s in self.sequences[:SAMPLES]],
        )


class _Session:
    """A base model with the PEFT adapter loaded once, and the encoded prompts and pairs."""

    def __init__(self, model, tokenizer, base_ref, scheme, prompts, pairs, tokens, batch_size, chat_template, task_id, device):
        self.model, self.tokenizer, self.base_ref, self.scheme = model, tokenizer, base_ref, scheme
        self.prompts, self.tokens, self.batch_size, self.task_id, self.device = prompts, tokens, batch_size, task_id, device
        self.chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.eos = _eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.encoded = [self._encode_prompt(p) for p in prompts]
        self.pairs = [(self._encode_prompt(p.prompt), self._encode_text(p.positive), self._encode_text(p.negative)) for p in pairs]
        forward_args = inspect.signature(model.get_base_model().forward).parameters
        self.cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self.keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in forward_args), None)

    @classmethod
    def open(cls, adapter, base, scheme, device, dtype, task_id, prompts, pairs, tokens, batch_size, chat_template) -> "_Session":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .verify import _loading_bars

        if tokens < 1 or batch_size < 1:
            raise SweepError(f"tokens and batch_size must be at least 1, got tokens={tokens}, batch_size={batch_size}.")
        prompts = list(default_prompts() if prompts is None else prompts)
        pairs = [_pair(p) for p in pairs or []]
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise SweepError("prompts must be a non-empty list of non-empty strings.")
        loaded = load_adapter(resolve(str(adapter), "adapter"))
        chosen = loaded.family.scheme(scheme)
        if task_id is not None and "task_id" not in loaded.family.options:
            raise SweepError(f"task_id applies to Poly adapters only; {loaded.path} is a {loaded.peft_type} adapter.")
        base_ref = str(base if base is not None else loaded.base_model or "")
        if not base_ref:
            raise BaseModelError(f"{loaded.path}/adapter_config.json names no base_model_name_or_path; pass base (--base).")
        base_path = resolve(base_ref, "base")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = _dtype(dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(base_path)
        except Exception as e:  # transformers raises many types for a missing or broken tokenizer
            raise BaseModelError(f"sweep needs the base's tokenizer, and {base_path} has none usable ({type(e).__name__}: {e}).") from None
        with _loading_bars(False):
            try:
                model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype).to(device)
            except Exception as e:  # transformers raises many types for a folder it cannot load
                raise BaseModelError(f"transformers cannot load {base_path} as a causal LM ({type(e).__name__}: {e}).") from None
            try:
                with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
                    warnings.simplefilter("ignore", FutureWarning)
                    model = PeftModel.from_pretrained(model, str(loaded.path)).eval()
            except Exception as e:  # PEFT raises many types for an adapter that does not fit the base
                raise BaseModelError(f"PEFT cannot load {loaded.path} onto {base_path} ({type(e).__name__}: {e}).") from None
        return cls(model, tokenizer, base_ref, chosen, prompts, pairs, tokens, batch_size, chat_template, task_id, device)

    def _encode_prompt(self, text: str) -> list[int]:
        if self.chat_template:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            return self.tokenizer(rendered, add_special_tokens=False).input_ids
        return self.tokenizer(text).input_ids

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # -- the measurement of a list of coeffs

    def measure(self, coeffs: Sequence[float], progress: bool, desc: str, transient: bool = False) -> dict[float, SweepPoint]:
        """Every coeff on every prompt (and pair): batches outside, so each batch's base prompt cache serves all coeffs.
        transient: the progress bar disappears when done."""
        tallies = {c: _Tally() for c in coeffs}
        batches = list(self._batches([(ids,) for ids in self.encoded]))
        pair_batches = list(self._batches(self._pair_rows()))
        total = len(coeffs) * (len(batches) + len(pair_batches))
        bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=not transient)
        with torch.no_grad(), bar:
            for _, batch in batches:
                self._base_prompt(batch)
                for c in coeffs:
                    self._rollout_stats(batch, c, tallies[c])
                    bar.update()
            for rows, batch in pair_batches:
                for c in coeffs:
                    tallies[c].completions += self._completion_logprobs(rows, batch, c)
                    bar.update()
        return {c: tallies[c].point(c, self._decode, bool(self.pairs)) for c in coeffs}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _pair_rows(self) -> list[tuple[list[int], int]]:
        """Each pair as two sequences (prompt + positive, prompt + negative) with their completion lengths."""
        return [(prompt + completion, len(completion)) for prompt, pos, neg in self.pairs for completion in (pos, neg)]

    def _batches(self, rows: list[tuple]) -> Iterable[tuple[list[tuple], _Batch]]:
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(row[0]) for row in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, width - len(row[0]) :] = torch.tensor(row[0])
                mask[i, width - len(row[0]) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            yield chunk, _Batch(ids.to(self.device), mask.to(self.device), positions.to(self.device), start)

    def _forward(self, ids, mask, positions, cache=None, keep: int | None = None):
        """(float32 log-probs of the kept positions, the KV cache) from the PEFT tuner (which forwards task_ids)."""
        kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": True, self.cache_arg: cache}
        if self.task_id is not None:
            kwargs["task_ids"] = torch.full((ids.shape[0],), self.task_id, device=ids.device)
        if keep is not None and self.keep_arg:
            kwargs[self.keep_arg] = keep
        out = self.model.base_model(input_ids=ids, **kwargs)
        logits = out.logits if keep is None else out.logits[:, -keep:]
        return logits.float().log_softmax(-1), out[self.cache_arg]

    def _base_prompt(self, batch: _Batch) -> None:
        with self.model.disable_adapter():
            logprobs, batch.base_cache = self._forward(batch.ids, batch.mask, batch.positions, keep=1)
        batch.base_first = logprobs[:, -1]

    def _rollout_stats(self, batch: _Batch, coeff: float, tally: _Tally) -> None:
        with scaled(self.model, coeff, scheme=self.scheme.name):
            generated, valid, steered = self._rollout(batch)
        with self.model.disable_adapter():
            base = self._teacher_forced(batch, generated, copy.deepcopy(batch.base_cache), batch.base_first)
        tally.kl.append(_kl(steered, base)[valid].cpu())
        tally.nll.append(-base.gather(-1, generated.unsqueeze(-1)).squeeze(-1)[valid].cpu())
        tally.sequences += [row[keep].tolist() for row, keep in zip(generated.cpu(), valid.cpu())]

    def _rollout(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy decoding with the KV cache: (tokens B×n, valid B×n, log p_c at every generated position B×n×V).

        A row is valid up to and including its first end-of-sequence token; later rows are fed padding.
        """
        first, cache = self._forward(batch.ids, batch.mask, batch.positions, keep=1)
        prompt_cache = copy.deepcopy(cache)
        eos = torch.tensor(sorted(self.eos), dtype=torch.long, device=self.device)
        done = torch.zeros(batch.ids.shape[0], dtype=torch.bool, device=self.device)
        mask, positions, scores = batch.mask, batch.positions[:, -1:], first[:, -1]
        tokens, valid = [], []
        for step in range(self.tokens):
            next_token = torch.where(done, self.pad, scores.argmax(-1))
            tokens.append(next_token)
            valid.append(~done)
            done = done | torch.isin(next_token, eos)
            if step == self.tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            logprobs, cache = self._forward(next_token[:, None], mask, positions, cache, keep=1)
            scores = logprobs[:, -1]
        generated = torch.stack(tokens, dim=1)
        steered = self._teacher_forced(batch, generated, prompt_cache, first[:, -1])
        return generated, torch.stack(valid, dim=1), steered

    def _teacher_forced(self, batch: _Batch, generated: torch.Tensor, prompt_cache, first: torch.Tensor) -> torch.Tensor:
        """Log-probs at every generated position (B×n×V): the prompt's last position, then one forward over
        the generated tokens but the last, on top of the prompt's cache."""
        n = generated.shape[1]
        if n == 1:
            return first[:, None]
        inputs = generated[:, :-1]
        mask = torch.cat([batch.mask, torch.ones_like(inputs)], dim=1)
        positions = batch.positions[:, -1:] + torch.arange(1, n, device=self.device)
        rest, _ = self._forward(inputs, mask, positions, prompt_cache)
        return torch.cat([first[:, None], rest], dim=1)

    def _completion_logprobs(self, rows: list[tuple[list[int], int]], batch: _Batch, coeff: float) -> list[float]:
        """Σ log p_c(completion token | prompt, completion before it), teacher-forced, per row of the batch."""
        width = max(length for _, length in rows)
        with scaled(self.model, coeff, scheme=self.scheme.name):
            logprobs, _ = self._forward(batch.ids, batch.mask, batch.positions, keep=width + 1)
        targets = batch.ids[:, -width:]
        token_logprobs = logprobs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # position j predicts j + 1
        return [float(token_logprobs[i, width - length :].sum()) for i, (_, length) in enumerate(rows)]

    # -- the search for c*

    def search(self, target: KLTarget, measured: dict[float, SweepPoint], progress: bool) -> tuple[float | None, str | None]:
        """c* of `target.sign` with kl_p95 within TOLERANCE of target.kl: (c*, None), or (None, the reason).

        Bracketing from |c| = 1, doubling up to MAX_COEFF, then bisection, each step first trying the
        interpolation of log kl against log |c|. The steps do not depend on what `measured` holds (the sweep's
        points are only reused), so a sweep and a merge calibrating on the same prompts find the same c*.
        Every measured point is added to `measured`.
        """
        budget, sign = target.kl, target.sign

        def kl(magnitude: float) -> float:
            c = sign * magnitude
            if c not in measured:
                measured.update(self.measure([c], progress, f"calibrating {target}: c = {c:g}", transient=True))
            return measured[c].kl_p95

        def close(magnitude: float) -> bool:
            return abs(kl(magnitude) - budget) <= TOLERANCE * budget

        lo, hi, magnitude = 0.0, None, 1.0
        while hi is None:
            if close(magnitude):
                return sign * magnitude, None
            if kl(magnitude) >= budget:
                hi = magnitude
            elif magnitude >= MAX_COEFF:
                return None, f"kl_p95 reaches only {kl(magnitude):.3g} nat at c = {sign * magnitude:g}"
            else:
                lo, magnitude = magnitude, min(MAX_COEFF, 2 * magnitude)
        zero = 0.0 if self.scheme.base_at_zero else kl(0.0)
        for _ in range(MAX_REFINEMENTS):
            guess = _next_guess(lo, zero if lo == 0 else kl(lo), hi, kl(hi), budget)
            if guess is None:
                break
            if close(guess):
                return sign * guess, None
            lo, hi = (guess, hi) if kl(guess) < budget else (lo, guess)
        low_kl = zero if lo == 0 else kl(lo)
        return None, (
            f"kl_p95 jumps from {low_kl:.3g} at c = {sign * lo:g} to {kl(hi):.3g} at c = {sign * hi:g} (the greedy "
            f"rollout changes there); no coeff between is within {TOLERANCE:.0%} of {budget:g} nat"
        )


def _next_guess(lo: float, kl_lo: float, hi: float, kl_hi: float, budget: float) -> float | None:
    """The next |c| to measure inside (lo, hi), rounded to SIGNIFICANT_DIGITS; None when none is left.

    Near 0, KL grows like c², so log kl is close to linear in log |c|: interpolate that line (from lo = 0,
    take kl ∝ c²); fall back to the midpoint when the interpolation lands outside the middle 90 %."""
    if lo > 0 and kl_lo > 0:
        slope = (math.log(hi) - math.log(lo)) / (math.log(kl_hi) - math.log(kl_lo))
        guess = math.exp(math.log(lo) + slope * (math.log(budget) - math.log(kl_lo)))
    else:
        guess = hi * math.sqrt(budget / kl_hi)
    margin = 0.05 * (hi - lo)
    if not (lo + margin <= guess <= hi - margin):
        guess = (lo + hi) / 2
    for candidate in (guess, (lo + hi) / 2):
        rounded = float(f"{candidate:.{SIGNIFICANT_DIGITS}g}")
        if lo < rounded < hi:
            return rounded
    return None


def _eos_ids(model, tokenizer) -> set[int]:
    """The generation config's end-of-sequence ids, else the tokenizer's."""
    configured = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return ids or ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _kl(steered: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(p_c ‖ p_0) over the last dimension, from log-probs; 0 · log 0 = 0, and clamped at 0 against rounding."""
    terms = steered.exp() * (steered - base)
    return torch.where(steered.isneginf(), 0.0, terms).sum(-1).clamp_min(0)


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise SweepError(f"Unknown dtype {dtype!r}; use one of {', '.join(names)}.")
    return names[dtype]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SweepError(f"The sweep plot needs matplotlib, which is not installed: {PLOT_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: float | None, spec: str) -> str:
    width = spec.split(".")[0]
    return format(value, spec) if value is not None else format("–", f">{width or 1}")


def _cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"
