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
