"""Publishing to the Hugging Face Hub: a merged checkpoint, verified first, with its card."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars, validate_repo_id

from .card import NOT_VERIFIED, record_verification
from .errors import PushError, VerificationError
from .outputs import LOCAL_PATHS_NAME, PROVENANCE_NAME

if TYPE_CHECKING:
    from .verify import VerifyReport

LARGE_FOLDER_BYTES = 5 * 2**30
NOT_PUBLISHED = [LOCAL_PATHS_NAME]  # this machine's input paths (for verify here) stay here


def repo_url(repo_id: str) -> str:
    return f"{constants.ENDPOINT}/{repo_id}"


def check_push_target(repo_id: str, *, revision: str | None = None, create_pr: bool = False) -> None:
    """Refuse a push that cannot work (bad repo id, --revision with --create-pr, no token) before any work."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"{repo_id!r} is not a valid Hub repo id: {e} Use user/name, e.g. user/model-honest.") from None
    if create_pr and revision:
        raise PushError(
            "--create-pr opens a pull request against main; drop --revision, or push to the branch without --create-pr."
        )
    if get_token() is None:
        raise PushError(
            f"No Hugging Face token found to push to {repo_id}. "
            "Run `hf auth login` or set HF_TOKEN to a token with write access."
        )


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    verify: bool | VerifyReport = True,
    sibling_links: Mapping[float, str] | None = None,
    progress: bool = True,
) -> str:
    """Upload a merged checkpoint folder to the Hub repo `repo_id` (created if needed) and return its URL.

    verify=True runs `weightsteer.verify` on the folder first and pushes nothing if it fails; pass the
    report of an earlier `verify(folder)` to reuse it; verify=False pushes unverified, and the card
    says so. revision names a branch (created from main if missing); create_pr opens a pull request.
    sibling_links maps the coeffs of checkpoints merged in the same run to their URLs, for the card.
    The token comes from HF_TOKEN or `hf auth login` and is never printed.
    """
    folder = Path(folder)
    check_push_target(repo_id, revision=revision, create_pr=create_pr)
    if not (folder / PROVENANCE_NAME).is_file():
        raise PushError(f"{folder} has no {PROVENANCE_NAME}; push folders written by `weightsteer merge`.")
    report = _verified(folder) if verify is True else verify or None
    summary = report.to_dict() if report is not None else NOT_VERIFIED
    record_verification(folder, summary, repo_id=repo_id, sibling_links=sibling_links)
    if report is not None and not report.ok:
        raise VerificationError(
            f"{report.failure_message()}\nNothing was pushed. Merge again, or pass --no-verify to push anyway "
            "(the card will say it is unverified)."
        )
    try:
        with _progress_bars(progress):
            return _upload(folder, repo_id, private=private, revision=revision, create_pr=create_pr)
    except Exception as e:  # huggingface_hub raises many types: HTTP and network errors, malformed replies
        raise PushError(
            f"Pushing {folder} to {repo_id} failed ({type(e).__name__}: {e}). Run the same command again to "
            "resume: files the Hub already has are not sent twice."
        ) from None  # the chained exception would print the library's unredacted message


def _verified(folder: Path) -> VerifyReport:
    from .verify import verify  # verify imports merge, which imports this module

    return verify(folder)


def _upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, create_pr: bool) -> str:
    api = HfApi()
    url = api.create_repo(repo_id, private=private or None, exist_ok=True)
    if revision:
        api.create_branch(url.repo_id, branch=revision, exist_ok=True)
    # huggingface_hub < 2 commits upload_folder in one piece and cannot resume it; its upload_large_folder can.
    # From 2.0 on, upload_folder itself resumes and splits large folders into several commits.
    upload_large_folder = getattr(api, "upload_large_folder", None)
    if upload_large_folder is not None and not create_pr and _size(folder) > LARGE_FOLDER_BYTES:
        upload_large_folder(repo_id=url.repo_id, folder_path=folder, repo_type="model", revision=revision, ignore_patterns=NOT_PUBLISHED)
        return f"{url}/tree/{revision}" if revision else str(url)
    commit = api.upload_folder(
        repo_id=url.repo_id,
        folder_path=folder,
        revision=revision,
        create_pr=create_pr,
        commit_message=f"Upload {folder.name} (weightsteer)",
        ignore_patterns=NOT_PUBLISHED,
    )
    if commit.pr_url:
        return commit.pr_url
    return f"{url}/tree/{revision}" if revision else str(url)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
