"""`--push` / `weightsteer push` against a real HTTP server speaking the Hub's API (tests/hub_server.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants, snapshot_download
from peft import LoraConfig

import weightsteer
from conftest import TOKENS, load_base, make_adapter, model_logits
from hub_server import HubServer
from test_verify import tamper
from weightsteer.cli import main

TOKEN = "hf_weightsteerTestToken0123456789abcdef"


@pytest.fixture
def hub(tmp_path, monkeypatch, caplog):
    """The test Hub, with huggingface_hub pointed at it (its URLs are read from constants at call time)."""
    caplog.set_level(logging.DEBUG)
    with HubServer(tmp_path / "hub-storage", TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture
def adapter(bases, tmp_path):
    return make_adapter(bases("llama"), tmp_path / "adapter", LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert TOKEN not in result.output
    return result


def assert_token_nowhere(tmp_path, caplog) -> None:
    assert TOKEN not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_merge_push_roundtrip(hub, adapter, tmp_path, caplog):
    out = tmp_path / "model-honest"
    result = run("merge", adapter, "-c", "0.5", "-o", out, "--push", "user/model-honest")
    assert result.exit_code == 0, result.output
    assert f"pushed {out} to {hub.url}/user/model-honest" in result.stdout
    assert "POST /api/validate-yaml" in hub.requests  # the card went up with its metadata
    downloaded = snapshot_download("user/model-honest")
    assert torch.equal(model_logits(downloaded), model_logits(out))
    with torch.no_grad():
        assert torch.equal(load_base(downloaded)(TOKENS).logits, load_base(out)(TOKENS).logits)
    files = hub.files("user/model-honest")
    card = files["README.md"].decode()
    assert "coeff **0.5**" in card and "**passed**" in card and 'from_pretrained("user/model-honest")' in card
    assert json.loads(files["weightsteer.json"])["verification"]["ok"]
    assert_token_nowhere(tmp_path, caplog)


def test_push_without_output_writes_the_repo_name_first(hub, adapter, tmp_path, monkeypatch):
    """`weightsteer merge ADAPTER --coeff 0.5 --push user/model-honest`, as the project's one-line promise reads."""
    monkeypatch.chdir(tmp_path)
    result = run("merge", adapter, "--coeff", "0.5", "--push", "user/model-honest")
    assert result.exit_code == 0, result.output
    assert torch.equal(model_logits(snapshot_download("user/model-honest")), model_logits(tmp_path / "model-honest"))
    missing = run("merge", adapter, "--coeff", "0.5")
    assert missing.exit_code == 2 and "--output" in missing.output


def test_several_coeffs_push_and_link_siblings(hub, adapter, tmp_path):
    result = run("merge", adapter, "-c", "-1", "-c", "1", "-o", tmp_path / "m", "--push", "user/m", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    card = hub.files("user/m-c1")["README.md"].decode()
    assert "coeff **1**" in card and f"[m-c-1]({hub.url}/user/m-c-1)" in card
    assert "coeff **-1**" in hub.files("user/m-c-1")["README.md"].decode()


def test_failed_upload_is_reported_and_a_retry_resumes(hub, adapter, tmp_path, caplog):
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=1)
    hub.fail_commits = 1
    result = run("push", out, "user/resumed")
    assert result.exit_code == 1
    assert "Pushing" in result.stderr and "failed" in result.stderr and "500" in result.stderr
    assert "Run the same command again" in result.stderr
    assert "model.safetensors" not in hub.files("user/resumed")
    result = run("push", out, "user/resumed", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["url"] == f"{hub.url}/user/resumed"
    assert sum(r.startswith("PUT /lfs-upload/") for r in hub.requests) == 1  # the weights went up once
    assert hub.files("user/resumed")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert_token_nowhere(tmp_path, caplog)


def test_failed_verification_pushes_nothing(hub, adapter, tmp_path):
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    tamper(out, name, lambda w: w * 1.01)
    result = run("push", out, "user/tampered")
    assert result.exit_code == 1
    assert name in result.stderr and "Nothing was pushed" in result.stderr
    assert not hub.requests and not hub.repos
    with pytest.raises(weightsteer.VerificationError, match=name):
        weightsteer.push(out, "user/tampered")
    assert not hub.repos


def test_no_verify_is_recorded_in_the_card(hub, adapter, tmp_path):
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=1)
    assert run("merge", adapter, "-o", tmp_path / "again", "--push", "user/unverified", "--no-verify").exit_code == 0
    assert "**Not verified**: pushed with `--no-verify`" in hub.files("user/unverified")["README.md"].decode()
    assert run("push", out, "user/unverified-too", "--no-verify").exit_code == 0
    assert json.loads(hub.files("user/unverified-too")["weightsteer.json"])["verification"] == {"skipped": True}


def test_bad_repo_id_or_missing_token_fail_before_merging(hub, adapter, tmp_path, monkeypatch):
    out = tmp_path / "out"
    result = run("merge", adapter, "-o", out, "--push", "user/not a repo")
    assert result.exit_code == 1 and "'user/not a repo' is not a valid Hub repo id" in result.stderr
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    result = run("merge", adapter, "-o", out, "--push", "user/model")
    assert result.exit_code == 1 and "No Hugging Face token found" in result.stderr
    result = run("merge", adapter, "-o", out, "--push", "user/model", "--create-pr", "--revision", "dev")
    assert result.exit_code == 1
    assert not out.exists() and not hub.requests


def test_private_branch_and_pull_request(hub, adapter, tmp_path):
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=0.5)
    result = run("push", out, "org/steered", "--private", "--revision", "dev")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f"{hub.url}/org/steered/tree/dev")
    repo = hub.repos["org/steered"]
    assert repo.private and "model.safetensors" in hub.files("org/steered", "dev")
    assert "model.safetensors" not in hub.files("org/steered", "main")
    result = run("push", out, "org/steered", "--create-pr", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["url"] == f"{hub.url}/org/steered/discussions/1"
    assert "model.safetensors" in hub.files("org/steered", "refs/pr/1")


def test_adapter_and_base_from_the_hub_are_pinned(hub, bases, adapter, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    for repo, folder in (("org/base", bases("llama")), ("org/honest-adapter", adapter)):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    out = tmp_path / "out"
    result = run("merge", "org/honest-adapter", "--base", "org/base", "-c", "2", "-o", out, "--push", "org/honest-c2")
    assert result.exit_code == 0, result.output
    provenance = json.loads(hub.files("org/honest-c2")["weightsteer.json"])
    assert provenance["adapter_revision"] == hub.repos["org/honest-adapter"].refs["main"]
    assert provenance["base_revision"] == hub.repos["org/base"].refs["main"]
    card = hub.files("org/honest-c2")["README.md"].decode()
    assert "base_model: org/base" in card and "base_model_relation: finetune" in card
    assert f"`org/honest-adapter` (revision `{provenance['adapter_revision']}`)" in card
    assert weightsteer.verify(out).ok  # re-resolves both at the recorded commits
