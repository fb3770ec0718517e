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


def lynx_import_graph() -> dict[str, set[str]]:
    """lynx module -> the lynx modules it imports, at module level or inside functions alike."""
    import ast

    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "lynx").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: relative import (the graph reads absolute imports only)")
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from package import submodule` imports the submodule; `from module import name`, the module.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_imports_between_lynx_modules_have_no_loop():
    graph = lynx_import_graph()
    assert {"lynx.model", "lynx.checkpoint", "lynx.gguf"} <= set(graph) and "lynx.rope" in graph["lynx.model"]
    state = {}  # module -> "open" while on the current path, "done" after

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                raise AssertionError("import loop: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # The model is a leaf of the file readers: they take the class as an argument.
    assert not graph["lynx.checkpoint"] & {"lynx.model", "lynx.gguf"} and "lynx.model" not in graph["lynx.gguf"]
    # The model imports its own parts, and lynx.weights only inside from_pretrained / save_pretrained; nothing in
    # lynx.weights reaches the model, directly or through another module.
    assert graph["lynx.model"] <= {"lynx.config", "lynx.rope", "lynx.attention", "lynx.kernels", "lynx.weights"}
    weights = [m for m in graph if m == "lynx.weights" or m.startswith("lynx.weights.")]
    assert {"lynx.weights.safetensors", "lynx.weights.gguf_read", "lynx.weights.gguf_write"} <= set(weights)
    for module in weights:
        assert "lynx.model" not in reachable(graph, module), module


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_old_weights_import_paths_still_work():
    """lynx.checkpoint, lynx.gguf and lynx.gguf_export moved into lynx.weights (and lynx.convert); the old names are
    the same objects."""
    from lynx import checkpoint, convert, gguf, gguf_export, weights
    from lynx.weights import gguf_read, gguf_write, safetensors

    assert checkpoint.CheckpointError is weights.CheckpointError and checkpoint.hf_name is safetensors.hf_name
    assert checkpoint.load_pretrained is safetensors.load_safetensors
    assert gguf.GGUFError is weights.GGUFError and gguf.read_gguf_config is gguf_read.read_gguf_config
    assert gguf_export.convert_to_gguf is convert.convert_to_gguf and gguf_export.write_gguf is gguf_write.write_gguf
