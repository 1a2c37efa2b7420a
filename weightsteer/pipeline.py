"""merge → gguf → verify → push as one library call, so Python users and `weightsteer build` get the same
order and the same guarantees as the CLI: push targets and the converter are checked before any merge work,
every checkpoint is verified before anything is uploaded, and a failed verification uploads nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .card import record_calibration, record_verification
from .errors import SweepError, VerificationError
from .hub import check_push_target, push, repo_url
from .llamacpp import GGUFResult, check_converter, convert_model
from .merge import MergeResult, Steer, Target, finite_coeff, merge_targets
from .calibration import KLTarget
from .verify import VerifyReport, verify

PathLike = str | os.PathLike


@dataclass
class Published:
    """One output of a pipeline run: the merge, and what followed it."""

    merge: MergeResult
    verification: VerifyReport | None = None
    gguf: GGUFResult | None = None
    url: str | None = None
    calibration: Mapping | None = None  # how a kl:K coeff was found (Calibration.to_dict())

    def to_dict(self) -> dict:
        return self.merge.to_dict() | {
            "verification": self.verification.to_dict() if self.verification else None,
            "url": self.url,
        } | ({"gguf": self.gguf.to_dict()} if self.gguf else {}) | ({"calibration": self.calibration} if self.calibration else {})


def calibrate_coeffs(
    adapter: PathLike, coeffs: Sequence[float | KLTarget], **options
) -> tuple[list[float], dict[float, dict]]:
    """Replace every KLTarget of `coeffs` by the coeff a calibration finds (one model load for all of them).

    Returns the coeffs in order and, for each calibrated one, its record for weightsteer.json (pass it to
    merge_and_publish(calibrations=...)). options go to `weightsteer.sweep.calibrate` (prompts, tokens, base,
    scheme, device, dtype, task_id, progress); a budget that cannot be reached raises SweepError with the reason.
    """
    targets = [c for c in coeffs if isinstance(c, KLTarget)]
    if not targets:
        return [float(c) for c in coeffs], {}
    from .sweep import calibrate

    found = {c.target: c for c in calibrate(adapter, list(dict.fromkeys(targets)), **options)}
    failed = [f"coeff {t}: {c.reason}" for t, c in found.items() if c.coeff is None]
    if failed:
        raise SweepError("; ".join(failed) + ". Choose a smaller budget or give the coeff as a number.")
    resolved = [found[c].coeff if isinstance(c, KLTarget) else float(c) for c in coeffs]
    return resolved, {c.coeff: c.to_dict() for c in found.values()}


def merge_and_publish(
    adapter: PathLike,
    outputs: Mapping[float, PathLike],
    *,
    scheme: str | None = None,
    push_to: Mapping[float, str] | None = None,
    calibrations: Mapping[float, Mapping] | None = None,
    **options,
) -> list[Published]:
    """Merge at every coeff of `outputs` (coeff → folder) from one read of the base, then convert, verify and push.

    push_to maps coeffs to Hub repo ids; calibrations (from `calibrate_coeffs`) maps coeffs to how they were
    found; the other options are those of `publish_targets`.
    """
    repos, found = dict(push_to or {}), dict(calibrations or {})
    targets = [Target(Path(path), (Steer(adapter, finite_coeff(c), scheme),)) for c, path in outputs.items()]
    return publish_targets(targets, [repos.get(c) for c in outputs], calibrations=[found.get(c) for c in outputs], **options)


def publish_targets(
    targets: Sequence[Target],
    push_to: Sequence[str | None] = (),
    *,
    base: PathLike | None = None,
    base_id: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    task_id: int | None = None,
    overwrite: bool = False,
    verify_outputs: bool | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    gguf: bool = False,
    outtype: str = "f32",
    llama_cpp: PathLike | None = None,
    progress: bool = False,
    calibrations: Sequence[Mapping | None] = (),
) -> list[Published]:
    """Write every target from one read of the base, then convert, verify and push.

    push_to gives a Hub repo id (or None) per target. verify_outputs=True verifies every output; None only
    those pushed; False pushes unverified (the card says so). calibrations gives, per target, how a kl:K coeff
    was found (or None): it goes into weightsteer.json and the card.
    """
    repos = {i: repo for i, repo in enumerate(push_to) if repo}
    for repo in repos.values():
        check_push_target(repo, revision=revision, create_pr=create_pr)
    if gguf:
        check_converter(llama_cpp)  # a missing converter (or its dependencies) is reported before the merge
    results = merge_targets(
        targets, base=base, base_id=base_id, dtype=dtype, device=device, overwrite=overwrite, progress=progress, task_id=task_id
    )
    published = [Published(r, calibration=c) for r, c in zip(results, calibrations or [None] * len(results), strict=True)]
    for item in published:
        if item.calibration:
            record_calibration(item.merge.path, item.calibration)
        if gguf:
            item.gguf = convert_model(item.merge.path, outtype=outtype, llama_cpp=llama_cpp, overwrite=overwrite)
    if verify_outputs or (verify_outputs is None and repos):
        checked = published if verify_outputs else [published[i] for i in repos]
        _verify_all(checked, base, device, progress, pushing=bool(repos))
    links = {_sibling_key(published[i].merge): repo_url(repo) for i, repo in repos.items()}
    for i, repo in repos.items():
        item = published[i]
        item.url = push(
            item.merge.path,
            repo,
            verify=item.verification or False,
            private=private,
            revision=revision,
            create_pr=create_pr,
            sibling_links=links,
            progress=progress,
        )
    return published


def _sibling_key(result: MergeResult) -> float | str:
    """How the card finds a sibling's link: by coeff for one adapter, by folder name for a composition."""
    return result.coeff if result.coeff is not None else result.path.name


def _verify_all(published: list[Published], base: PathLike | None, device: str | None, progress: bool, pushing: bool) -> None:
    """Verify every merged checkpoint against the terms it records, and note the result in its card; raise if
    any failed (before any push)."""
    for item in published:
        r = item.merge
        item.verification = verify(r.path, base=base, device=device, progress=progress)
        record_verification(r.path, item.verification.to_dict())
    failed = [item.verification.failure_message() for item in published if not item.verification.ok]
    if failed:
        raise VerificationError("\n".join(failed) + ("\nNothing was pushed." if pushing else ""))


def worst_ratio(report: VerifyReport) -> float:
    """The verification's worst tensor, as a multiple of its tolerance."""
    return max((c.ratio for c in report.checks), default=0.0)
