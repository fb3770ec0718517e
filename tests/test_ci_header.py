"""The test log names the references' versions even under the README's `pytest -q` (CI installs their newest
releases; a failure a new release brings must say which one ran)."""

import subprocess
import sys
from importlib.metadata import version

from conftest import REPO


def test_quiet_test_run_prints_reference_versions_first_and_again_on_failure(tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert False\n")
    out = subprocess.run(
        # tests/conftest.py loaded as a plugin, as pytest loads it for the files beside it
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(failing)],
        cwd=REPO / "tests", capture_output=True, text=True, timeout=300,
    ).stdout
    lines = out.splitlines()
    first = lines[0]
    assert first.startswith("references: "), out
    for name in ("torch", "transformers", "accelerate", "gguf", "tokenizers", "tiktoken"):
        assert f"{name} {version(name)}" in first, (name, first)
    assert any(line.startswith("failed with references: ") for line in lines), out
