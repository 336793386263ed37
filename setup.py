import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (HERE / "megatron_simpo" / "__init__.py").read_text()).group(1)

setup(
    name="megatron_simpo",
    version=VERSION,
    description="SimPO (reference-free preference optimisation) on Megatron-Core",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_simpo", "megatron_simpo.*"]),
    install_requires=[
        # 0.16.1 is the newest for Python 3.11; NGC containers (Python 3.12) carry newer ones.
        "megatron-core>=0.16.1",
        "torch>=2.4",
        "transformers>=4.45",
        "datasets>=2.19",
        "safetensors>=0.4",
        "psutil>=5.9",  # dist_checkpointing needs it at save time
        "numpy",
        "einops",
        "tqdm",  # the converters' progress bar
        "matplotlib",  # tools/analyze_run.py's plots
    ],
    # Transformer Engine and NVIDIA Apex come from the NGC container: optional imports only.
    # TRL (pinned: the tests call its trainers' loss methods) is for tests and benchmarks only:
    # its losses are compared with ours, and `python -m tools.bench trl` times its CPOTrainer.
    # scipy: the tests check the analyses' statistics against it.
    # eval-test: the judges' own loaders read our answer files in the tests (FastChat's
    # llm_judge imports anthropic; alpaca-eval 0.6.6 imports pkg_resources, gone in setuptools 81).
    extras_require={"test": ["pytest>=7", "trl==1.16.0", "scipy"], "bench": ["trl==1.16.0"],
                    "eval-test": ["fschat==0.2.36", "anthropic", "alpaca-eval==0.6.6",
                                  "setuptools<81"]},
    entry_points={"console_scripts": [
        "megatron-simpo-train = megatron_simpo.cli.train:main",
        "megatron-simpo-convert-hf-to-megatron = megatron_simpo.cli.convert:hf_to_megatron_main",
        "megatron-simpo-convert-megatron-to-hf = megatron_simpo.cli.convert:megatron_to_hf_main",
        "megatron-simpo-reference-logps = megatron_simpo.cli.reference_logps:main",
        "megatron-simpo-generate-answers = megatron_simpo.cli.generate_answers:main",
        "megatron-simpo-build-pairs = megatron_simpo.cli.build_pairs:main",
        "megatron-simpo-analyze-run = megatron_simpo.cli.analyze_run:main",
    ]},
)
