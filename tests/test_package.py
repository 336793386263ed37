"""The package installs with pip and works from any directory, console scripts included."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("megatron-simpo-train", "megatron-simpo-convert-hf-to-megatron",
           "megatron-simpo-convert-megatron-to-hf", "megatron-simpo-reference-logps")


def test_pip_install_then_import_and_help_from_outside_the_repo(tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Dependencies are this environment's (nothing is downloaded); the build is pip's own.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=str(target))
    imported = subprocess.run(
        [sys.executable, "-c", "import megatron_simpo, megatron_simpo.training.loop; "
                               "print(megatron_simpo.__file__, megatron_simpo.__version__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    location, version = imported.stdout.split()
    assert Path(location).is_relative_to(target) and version.count(".") == 2
    for script in SCRIPTS:
        completed = subprocess.run([str(target / "bin" / script), "--help"], cwd=elsewhere,
                                   env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-2000:]
        assert "usage:" in completed.stdout and "--save" in completed.stdout
    completed = subprocess.run([str(target / "bin" / "megatron-simpo-build-pairs"), "--help"],
                               cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "--reward-model" in completed.stdout and "--prompts-path" in completed.stdout


# Which sub-packages each may import (besides itself and the package's own __init__): the
# architecture, from the bottom up. Nothing imports cli/; data/ and model/ never import training/.
LAYERS = {
    "distributed": set(),
    "model": {"distributed"},
    "data": {"distributed"},
    "checkpoint": {"model", "distributed"},
    "training": {"data", "model", "distributed", "checkpoint"},
    "convert": {"model", "distributed", "checkpoint"},
    "evaluation": {"data", "model", "distributed", "checkpoint", "convert"},
    "cli": {"data", "model", "distributed", "checkpoint", "training", "convert", "evaluation"},
}


def _imported_subpackages(path: Path) -> set[str]:
    """Sub-packages of megatron_simpo a file imports at run time (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for b in node.body for n in ast.walk(b)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.module == "megatron_simpo":
            found.update(alias.name for alias in node.names)
        elif node.module.startswith("megatron_simpo."):
            found.add(node.module.split(".")[1])
    return found


def test_sub_packages_depend_one_way():
    package = ROOT / "megatron_simpo"
    assert sorted(p.name for p in package.iterdir() if (p / "__init__.py").exists()) == \
        sorted(LAYERS)
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py"]  # no flat modules
    for layer, allowed in LAYERS.items():
        for path in sorted((package / layer).rglob("*.py")):
            wrong = _imported_subpackages(path) - allowed - {layer}
            assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_one_batch_walkthrough_names_only_functions_that_exist():
    """docs/one-batch.md follows a batch through `file:function` hops; each must still be
    defined there (a module-level function or class, or Class.method)."""
    import re

    text = (ROOT / "docs" / "one-batch.md").read_text()
    hops = re.findall(r"(megatron_simpo/[\w/]+\.py):([\w.]+)", text)
    assert len(hops) >= 25
    for path, qualname in hops:
        tree = ast.parse((ROOT / path).read_text())
        scope = tree.body
        for part in qualname.split("."):
            found = [node for node in scope if isinstance(
                node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.name == part]
            assert found, f"docs/one-batch.md: {path}:{qualname} is not defined there"
            scope = found[0].body


def test_commands_hold_back_megatron_cores_import_warnings_about_absent_te_and_apex():
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    # What is held back: Megatron-Core's warning at the import of its optimizer, without
    # Transformer Engine and Apex (as here).
    optimizer = Path(importlib.util.find_spec("megatron.core.optimizer").origin)
    assert "Transformer Engine and Apex are not installed" in optimizer.read_text()
    importing = "import megatron.core.optimizer, megatron.core.optimizer.clip_grads"
    command = subprocess.run([sys.executable, "-W", "default", "-c",
                              f"import megatron_simpo.cli.convert; {importing}"],
                             capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr
    assert "Transformer Engine and Apex are not installed" not in command.stderr, command.stderr


def test_a_file_is_written_whole_or_not_at_all(tmp_path):
    import pytest

    from megatron_simpo.distributed.files import write_text_atomically

    path = tmp_path / "metrics.jsonl"
    assert write_text_atomically(path, '{"iteration": 1}\n') == path
    with pytest.raises(UnicodeEncodeError):  # fails mid-write, as a full disk would
        write_text_atomically(path, '{"iteration": 2, "note": "\ud800"}\n')
    assert path.read_text() == '{"iteration": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no partial left
