"""lynx owns one top-level import name. A `kernels` package of ours once shadowed Hugging Face's `kernels` (which
transformers 5.25 imports to load LlamaForCausalLM) for everyone who installed lynx or ran a script from the repo."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from conftest import REPO


def test_the_distribution_installs_only_the_lynx_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(REPO), include=config["include"], exclude=config.get("exclude", ()))
    assert "lynx" in packages and "lynx.kernels" in packages
    assert {p.split(".")[0] for p in packages} == {"lynx"}, packages


def test_no_importable_package_or_module_at_the_repository_root_but_lynx():
    # Running `python judge.py` puts the repository root first on sys.path: anything importable there shadows the
    # installed package of the same name. tests/ is pytest's, never on a user's path.
    roots = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"tests"}
    modules = {p.stem for p in REPO.glob("*.py")} - {"train", "judge"}  # the two command lines, run as scripts
    assert roots == {"lynx"} and not modules, (roots, modules)


def test_transformers_loads_llama_from_the_repository_root():
    code = (
        "import importlib.util, transformers; transformers.LlamaForCausalLM\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else 'absent')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "absent" or Path(origin).parent.parent != REPO, f"`import kernels` resolves to {origin}"


def test_huggingface_kernels_is_the_kernels_package_when_installed():
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25 does not need it)")
    assert Path(spec.origin).parent.parent != REPO, spec.origin
    import kernels

    assert hasattr(kernels, "get_kernel"), f"{kernels.__file__} is not Hugging Face's kernels"
