"""Parallel layout, process groups and Megatron's parallel state, launching ranks, signals and shutdown, the CPU redirections, files written whole for other processes."""
