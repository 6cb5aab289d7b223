"""Thread settings of the numeric libraries around the decode loops (torch imported only when used)."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Keep numpy's BLAS (OpenBLAS) to one thread inside the block; usable as a decorator.

    The prompt generators do small numpy matrix products between decodes. A multi-threaded OpenBLAS
    leaves its worker threads busy-waiting for a while after each product, and on a small machine they
    take the cores the mask decoder needs next, which slows the decode (docs/PERFORMANCE.md has the
    figure). The products are too small to gain from threads. Without threadpoolctl the block runs unchanged."""
    controller = _controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block's torch operations on one thread, restoring torch's thread count after it.

    For small work between decodes (an embedding's float16 -> float32 cast): on two threads it would wake
    torch's thread pool, whose workers then spin on the cores the next decode needs. Setting the count is
    cheap enough to do around every such call (figures in docs/PERFORMANCE.md)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_CONTROLLER: list = []  # [(number of imported modules when made, controller or None)]


def _controller():
    """A threadpoolctl controller of the BLAS libraries loaded now; None without threadpoolctl (optional:
    only the speed differs). Finding the libraries costs about 10 ms, too much to repeat on every slice
    re-run, so the controller is kept and made again only when modules were imported since (which may
    have loaded another BLAS)."""
    import sys

    if _CONTROLLER and _CONTROLLER[0][0] == len(sys.modules):
        return _CONTROLLER[0][1]
    try:
        import scipy.linalg  # noqa: F401  (scipy's own BLAS, when it has one, is then known too)
    except ImportError:
        pass
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        controller = None
    else:
        controller = ThreadpoolController()
    _CONTROLLER[:] = [(len(sys.modules), controller)]
    return controller
