#!/usr/bin/env python
"""Train SimPO (or DPO) on Megatron-Core. Run under torchrun; see examples/train_simpo_llama3.sh."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_simpo.train import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
