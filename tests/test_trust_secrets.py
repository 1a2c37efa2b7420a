"""The token never appears in what weightsteer prints or raises, even when a server's error reply echoes the
request's headers (tests/hub_server.py with echo_headers, on 127.0.0.1)."""

from __future__ import annotations

import json

import urllib.error
import urllib.request
import pytest
from click.testing import CliRunner

import weightsteer
from test_push import TOKEN, adapter, hub  # noqa: F401  (fixtures)
from weightsteer.cli import main


@pytest.fixture
def echoing(hub):  # noqa: F811
    hub.echo_headers = True
    request = urllib.request.Request(f"{hub.url}/api/models/org/missing", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as reply:
        urllib.request.urlopen(request)
    assert TOKEN in reply.value.read().decode()  # the server really leaks it: the tests below are not vacuous
    return hub


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("command", [["merge", "org/missing", "-o", "OUT"], ["inspect", "org/missing"]])
@pytest.mark.parametrize("as_json", [False, True])
def test_hub_errors_that_echo_the_token_are_redacted(echoing, tmp_path, caplog, command, as_json):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command] + (["--json"] if as_json else [])
    result = invoke(*args)
    assert result.exit_code == 1 and "org/missing" in result.output
    assert TOKEN not in result.output and "Bearer" not in result.output.replace("Bearer ***", "")
    assert "Authorization': '***" in result.output or "authorization': '***" in result.output.lower()
    if as_json:
        assert TOKEN not in json.loads(result.stdout)["error"]
    assert TOKEN not in caplog.text


def test_api_errors_are_redacted_too(echoing, tmp_path):
    with pytest.raises(weightsteer.AdapterError) as error:
        weightsteer.merge("org/missing", tmp_path / "out")
    assert TOKEN not in str(error.value) and error.value.__cause__ is None  # no unredacted chained message


def test_a_failed_push_whose_reply_echoes_the_token_is_redacted(echoing, adapter, tmp_path):  # noqa: F811
    out = weightsteer.merge(adapter, tmp_path / "out")
    echoing.fail_commits = 1
    result = invoke("push", out, "user/echo")
    assert result.exit_code == 1 and "Pushing" in result.stderr and "500" in result.stderr
    assert TOKEN not in result.output


def test_the_local_paths_file_is_never_uploaded(hub, adapter, tmp_path):  # noqa: F811
    out = weightsteer.merge(adapter, tmp_path / "out")
    assert (out / ".weightsteer-local.json").is_file()
    assert invoke("push", out, "user/clean").exit_code == 0
    files = hub.files("user/clean")
    assert ".weightsteer-local.json" not in files
    for name in ("README.md", "weightsteer.json"):
        assert str(tmp_path) not in files[name].decode(), name
