from setuptools import find_packages, setup

setup(
    name="megatron_simpo",
    version="0.1.0",
    description="SimPO (reference-free preference optimisation) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
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
    ],
    # Transformer Engine and NVIDIA Apex come from the NGC container: optional imports only.
    # "bench": TRL's CPOTrainer for tools/bench_simpo.py --only trl (not needed to train or test).
    extras_require={"test": ["pytest>=7"], "bench": ["trl>=0.12"]},
)
