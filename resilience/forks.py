"""Forks: a process forked from one that holds fleet state is a new replica.

What a parent took from the fleet (a store's replica id and connections, a share of a
limit, tokens taken ahead, a health check's lease) is the parent's, never also the child's.
An object that holds such state registers here and gets its ``_forked()`` called in any child
process forked after that, stores first (the others build their ids from a store's).
A base module: it imports nothing of the package.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Protocol

__all__ = ["Forkable", "reset_in_child"]

logger = logging.getLogger("resilience")


class Forkable(Protocol):
    """What registers: an object that knows how to start afresh in a forked child."""

    def _forked(self) -> None:
        """In a forked child: drop what the parent holds (no I/O: the parent's sockets, tasks
        and timers are not this process's)."""


_stores: weakref.WeakSet[Any] = weakref.WeakSet()
_others: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_in_child(obj: Forkable, *, store: bool = False) -> None:
    """Call ``obj._forked()`` in any child process forked after this (``store``: before the
    objects that are not stores). Weakly held: registering keeps nothing alive."""
    (_stores if store else _others).add(obj)


def _after_fork_in_child() -> None:
    for group in (_stores, _others):
        for obj in list(group):
            try:
                obj._forked()
            except Exception:  # one object's trouble must not leave the others inherited
                logger.exception("resetting %r after a fork failed", obj)


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
