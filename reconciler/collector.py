"""The cyclic garbage collector, paused while a run makes many objects and no cycles.

A command makes a few objects per certificate (parsing users.yaml alone makes hundreds of
thousands) and no reference cycles worth the name: each collection it triggers scans a growing
heap for nothing, which made loading 100,000 users quadratic and cost a sixth of a no-op over
10,000 names. Reference counting still frees everything as usual.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def paused(*, freeze: bool = False) -> Iterator[None]:
    """No cyclic collection inside the block, and the collector as it was afterwards.
    freeze: also leave every object made so far (the imported modules) out of any collection
    until the block ends."""
    was_enabled = gc.isenabled()
    if freeze:
        gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        if freeze:
            gc.unfreeze()


_kept: dict[str, object] | None = None


def keep_until_exit() -> None:
    """For a process that ends with os._exit (the `reconciler` command): from now on, keep()
    holds what a run built instead of letting it be freed, object by object, as the run
    returns. At 100,000 names that freeing is a quarter of a second of a no-op, spent on
    memory the exit hands back at once. The cyclic collector stays off for good as well: its
    first collection after the run would walk every object kept (a quarter of a second more)."""
    global _kept
    _kept = {}
    gc.disable()


def keep(slot: str, value: T) -> T:
    """value, held until the process exits when keep_until_exit() was called. A slot holds
    one value: a run that repeats (apply's push retries) frees the previous one."""
    if _kept is not None:
        _kept[slot] = value
    return value
