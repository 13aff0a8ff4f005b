"""Torch intra-op threads for small models.

The policies' tensors are tiny (a few hundred rows of a 2-layer model), so fanning each op out to
threads costs more than it saves; on this 2-core machine a second busy process made every small
op ~100x slower. Policies run their torch work with one thread and restore the setting after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` intra-op threads, then restore torch's setting (None: leave it)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
