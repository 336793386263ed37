"""Tests run Megatron code on several gloo ranks through the package's own launcher.

The ranks of each world size are started once per test session (``launch.LocalWorld``) and
reused by every test: each call still gets its own process group and Megatron parallel state,
and the suite saves the start-up of Python, torch and Megatron-Core in every rank of every call.

A world outlives its test module only while lean: a call that leaves a model alive leaves its
gloo groups' threads polling (measured idle: 10% of a core per rank at 404 threads, under 1% at
30), so after each module a world holding more than ``LEAN_THREADS`` per rank is stopped
(tests/conftest.py) and the next call starts a fresh one.
"""

import atexit

from megatron_simpo.distributed import launch

_WORLDS: dict[int, launch.LocalWorld] = {}
# A call that leaves a model alive keeps its gloo groups' threads polling (their idle cost:
# the module docstring; a run frees them: components.release, runtime.shutdown); past this many
# a world is replaced before its next call, even mid-module.
MAX_THREADS = 300
LEAN_THREADS = 48
"""Threads per rank a world may hold and still outlive its test module (a fresh rank: ~10)."""


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
    """Stop every reused world (at exit)."""
    for world in _WORLDS.values():
        world.close()
    _WORLDS.clear()


def close_busy_worlds() -> None:
    """Stop the worlds whose ranks hold more than ``LEAN_THREADS`` threads, or have died
    (after each test module: tests/conftest.py); lean ones serve the next modules."""
    for size, world in list(_WORLDS.items()):
        if world.threads > LEAN_THREADS or not world.alive:
            world.close()
            del _WORLDS[size]


def run_on_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """``fn(rank, *args)`` on every rank of a reused world, with a timeout so a hung collective
    fails the test instead of CI."""
    return _world(world_size).run(fn, *args, timeout=timeout)


def run_on_fresh_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """The same in newly started processes, for calls that need a fresh interpreter."""
    return launch.run_on_ranks(world_size, fn, *args, timeout=timeout)
