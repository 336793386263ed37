#!/usr/bin/env python
"""Train SimPO (or a baseline: DPO, IPO, CPO, ORPO, R-DPO, RRHF, SLiC-HF) on Megatron-Core. Run under torchrun; see examples/train_simpo_llama3.sh."""

from megatron_simpo.cli.train import main

if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
