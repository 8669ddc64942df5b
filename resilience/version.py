"""The distribution's name and version (a base module: anything may import it)."""

from __future__ import annotations

__all__ = ["DISTRIBUTION", "__version__"]

__version__ = "0.1.0"
DISTRIBUTION = "resilience-fleet"  #: the name to ``pip install`` (the import name is resilience)
