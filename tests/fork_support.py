"""Running a piece of a test in a forked child (what a pre-forking server does to a process)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable


def in_forked_child(work: Callable[[], Awaitable[str]]) -> str:
    """Fork; in the child, run ``work()`` on a new event loop (the objects it uses are the
    ones inherited from this process) and send back what it returns. Raises
    ``AssertionError`` if the child failed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 1
        try:
            os.close(read)
            os.write(write, asyncio.new_event_loop().run_until_complete(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)  # the child is quick
    try:
        out = os.read(read, 1000).decode()
    finally:
        os.close(read)
    assert status == 0, f"the forked child failed (status {status})"
    return out
