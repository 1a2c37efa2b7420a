"""`weightsteer --help`, `schemes` and argument errors answer without importing torch, transformers or peft."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "safetensors", "huggingface_hub")


def _modules_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def _heavy(modules: set[str]) -> list[str]:
    return [name for name in HEAVY if name in modules]


def test_importing_the_package_and_the_cli_loads_nothing_heavy():
    assert _heavy(_modules_after("import weightsteer, weightsteer.cli")) == []


def test_help_and_argument_errors_load_nothing_heavy():
    argvs = [["--help"], ["merge", "--help"], ["merge"], ["merge", "a"], ["merge", "a", "-o", "b", "--coeff", "x"]]
    for argv in (*argvs, ["merge", "a", "-o", "b", "-c", "kl:0"], ["sweep", "--help"], ["sweep", "a", "--coeffs", "x"]):
        code = f"from weightsteer.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
        assert _heavy(_modules_after(code)) == [], argv


def test_lazy_public_names_resolve_to_the_functions():
    import weightsteer
    import weightsteer.merge  # noqa: F401  (the submodule import must not shadow the function)

    assert callable(weightsteer.merge) and weightsteer.merge.__module__ == "weightsteer.merge"
    assert weightsteer.verify.__module__ == "weightsteer.verify"
    assert set(weightsteer.__all__) <= set(dir(weightsteer))
