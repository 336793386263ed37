"""Values that every layer of one forward pass shares: attention masks and FlexAttention block
masks, made by the first layer and reused by the others.

An entry is keyed by its ``source``, the object it is made from (a micro-batch's mask tensor or
its packed row's segment starts, alive for the forward and backward of that micro-batch;
:data:`CAUSAL` for causal rows, which have neither), held by weak reference so that a finished
micro-batch's entry never matches, and by a ``key`` of plain values (shapes, a window, a
dtype). Reusing one object across layers also keeps the attention's saved-for-backward masks
one tensor, not one per layer. The last few entries are kept.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

_SIZE = 8
_cache: list = []  # [(weakref to the source, key, value)], newest last


class _Causal:
    """The source of causal masks (made from their shape alone)."""


CAUSAL = _Causal()


def per_forward(source: Any, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, reused while ``source`` is the same object and ``key`` equal."""
    for ref, cached_key, value in _cache:
        if ref() is source and cached_key == key:
            return value
    value = make()
    # Entries whose source is gone can never match again: dropped first, so that they do not
    # push out live ones (a source made anew in every layer, e.g. a view, would otherwise
    # evict the forward's masks every few layers).
    _cache[:] = [entry for entry in _cache if entry[0]() is not None]
    _cache.append((weakref.ref(source), key, value))
    del _cache[:-_SIZE]
    return value


def clear() -> None:
    """Forget every entry."""
    _cache.clear()
