"""Tests run Megatron code on several gloo ranks through the package's own launcher.

The ranks of each world size are started once per test session (``launch.LocalWorld``) and
reused by every test: each call still gets its own process group and Megatron parallel state,
and the suite saves the start-up of Python, torch and Megatron-Core in every rank of every call.
"""

import atexit

from megatron_simpo.distributed import launch

_WORLDS: dict[int, launch.LocalWorld] = {}
# A call that leaves a model alive keeps its gloo groups' threads polling (about 0.05% of a
# core each; a run frees them: components.release); past this many a world is replaced.
MAX_THREADS = 300


def _world(world_size: int) -> launch.LocalWorld:
    world = _WORLDS.get(world_size)
    if world is not None and world.threads > MAX_THREADS:
        world.close()
        world = None
    if world is None or not world.alive:
        world = _WORLDS[world_size] = launch.LocalWorld(world_size)
    return world


@atexit.register
def close_worlds() -> None:
    """Stop every reused world (at exit, and after each test module: tests/conftest.py)."""
    for world in _WORLDS.values():
        world.close()
    _WORLDS.clear()


def run_on_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """``fn(rank, *args)`` on every rank of a reused world, with a timeout so a hung collective
    fails the test instead of CI."""
    return _world(world_size).run(fn, *args, timeout=timeout)


def run_on_fresh_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """The same in newly started processes, for calls that need a fresh interpreter."""
    return launch.run_on_ranks(world_size, fn, *args, timeout=timeout)
