"""Plots and a JSON summary of a training run (``megatron-simpo-analyze-run``): training and
held-out curves, held-out margin distributions, length correlations, KL from the reference.

  python tools/analyze_run.py outputs/demo          # -> outputs/demo/analysis/*.png, summary.json
"""

from megatron_simpo.cli.analyze_run import main

if __name__ == "__main__":
    main()
