"""The README stays true: its scheme table is generated from the code, and CI runs its commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from weightsteer.adapters import scheme_table
from weightsteer.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_scheme_table_is_current():
    table = re.search(r"<!-- schemes:start -->\n(.*?)\n<!-- schemes:end -->", README, re.S).group(1)
    assert table == scheme_table(), "regenerate the README table from `weightsteer schemes`"


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 -e ".[test]"' in README and 'torch==2.13.0 -e ".[test]"' in ci
    assert "\n    python -m pytest\n" in README and "python3 -m pytest\n" in ci


@pytest.mark.parametrize("command", ["merge", "verify", "push", "inspect", "export-lora", "gguf", "sweep", "schemes"])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    if command not in ("schemes",):
        assert "Examples:" in result.output
