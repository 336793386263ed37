#!/usr/bin/env python
"""Reference log-probs of every pair, computed once for dpo/ipo/rdpo (= megatron-simpo-reference-logps).

Run it like training (torchrun ... tools/compute_reference_logps.py <training flags>)."""

from megatron_simpo.cli.reference_logps import main

if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
