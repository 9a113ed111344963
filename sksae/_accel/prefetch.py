"""Read ahead: the items of an iterator produced by a background thread.

Out-of-core training reads its next buffer of rows (disk reads, the gather of
a shuffle, pinning for a host-to-device copy) while the current one trains;
torch and numpy copies release the GIL, so the two overlap. Kept where
``benchmarks/bench_out_of_core.py`` measures it worth it (see the results
there).
"""

from __future__ import annotations

import queue
import threading

__all__ = ["read_ahead"]

_DONE = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def read_ahead(items, depth=2):
    """Iterate over ``items`` (an iterator) computed ``depth`` items ahead in a thread.

    An exception raised by ``items`` is raised here, at the item where it
    occurred. Closing the returned generator early (a ``break``, an error or
    Ctrl-C in the consumer) stops the thread before it returns. ``depth=0``
    iterates in the calling thread.
    """
    if depth <= 0:
        yield from items
        return
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="sksae-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
