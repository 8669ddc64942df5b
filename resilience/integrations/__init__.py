"""``resilience.integrations`` in a checkout: the top-level ``integrations/`` folder.

The adapters live in ``integrations/`` at the repository's top, and setuptools installs that
folder as ``resilience.integrations`` (``package-dir`` in pyproject.toml): an installed
package, editable or not, never contains this file. A checkout needs it because Python puts
the current folder first on ``sys.path`` (``python -m resilience`` in the clone's root, the
demo's replica processes, a test run): the checkout's ``resilience/`` then shadows any
installed copy, and without this file it would have no ``resilience.integrations``.

So this file points the package's ``__path__`` at that folder: ``resilience.integrations.httpx``
and the rest are the modules of ``integrations/``, loaded once, under one name. The package's
own names are those of ``integrations/__init__.py``, which re-exports ``_deadline``'s, as
this file does.
"""

from __future__ import annotations

from pathlib import Path

_folder = Path(__file__).resolve().parent.parent.parent / "integrations"
if not (_folder / "__init__.py").is_file():  # pragma: no cover - a partial copy of the tree
    raise ImportError(f"resilience.integrations: {_folder} is missing from this checkout")
__path__ = [str(_folder)]

from ._deadline import *  # noqa: E402, F403 - the helpers' own __all__
from ._deadline import __all__ as __all__  # noqa: E402
