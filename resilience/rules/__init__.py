"""Pure rules: no I/O, no asyncio, no clock of their own (every method takes ``now``).

The sliding windows, the circuit breaker's state machine, GCRA, the failure detectors and
the adaptive concurrency limits. Everything above builds on them; they import only the base
modules (``errors``, ``clock``, ``checks``, ``states``), and are tested without an event loop.
"""
