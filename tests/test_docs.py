"""The README stays true: its scheme table is generated from the code, and CI runs its commands."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TOKENS, load_base, make_adapter
from test_push import hub  # noqa: F401  (the test Hub, a fixture)
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


def test_readme_python_code_runs(bases, tmp_path, monkeypatch, hub):  # noqa: F811
    """Every ```python block of the README, in order and in one namespace, on tiny stand-ins for its names:
    ./honest-adapter (a LoRA on a tiny Llama), base_model and input_ids, and the test Hub for push."""
    from peft import LoraConfig

    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks and "report.passed" not in README  # VerifyReport has .ok
    monkeypatch.chdir(tmp_path)
    make_adapter(bases("llama"), tmp_path / "honest-adapter", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # "Combining adapters": two adapters, a base folder and the README's own recipe.
    shutil.copytree(bases("llama"), tmp_path / "base")
    make_adapter(bases("llama"), tmp_path / "honest", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=2)
    make_adapter(bases("llama"), tmp_path / "formal", LoraConfig(r=2, target_modules=["v_proj", "o_proj"]), seed=3)
    (tmp_path / "recipe.yaml").write_text(re.search(r"```yaml\n(.*?)```", README, re.S)[1])
    namespace = {"base_model": load_base(bases("llama")), "input_ids": TOKENS}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md, python block {number}", "exec"), namespace)
    assert {"user/model-honest", "user/honest-full"} <= set(hub.repos)
    assert (tmp_path / "steered" / "weightsteer.json").is_file() and (tmp_path / "honest-formal").is_dir()
