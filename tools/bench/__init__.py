"""Benchmarks of megatron_simpo, one module each, run through one dispatch (``__main__``).

  python -m tools.bench BENCHMARK [options]      # python tools/bench/__main__.py works too
  python -m tools.bench BENCHMARK --help

What they share (model presets, timing, peak memory, option groups, tables, the JSON report)
is in :mod:`tools.bench.common`. Each benchmark runs its variants in fresh worker processes
(``megatron_simpo.distributed.launch.run_on_ranks``), so every peak is its own.
"""
