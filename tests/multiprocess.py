"""Tests run Megatron code on several gloo ranks through the package's own launcher."""

from megatron_simpo import launch


def run_on_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """``launch.run_on_ranks`` with a timeout, so a hung collective fails the test instead of CI."""
    return launch.run_on_ranks(world_size, fn, *args, timeout=timeout)
