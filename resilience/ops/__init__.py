"""What operators use: the ``resilience`` command, the demo, the dashboard, redaction.

Nothing in the library imports this package; it builds on the public API (and the
adapters, for the demo and the dashboard).
"""
