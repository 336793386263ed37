"""The package installs with pip and works from any directory, console scripts included."""

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
