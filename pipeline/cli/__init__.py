"""The ``elodin`` command.

Each subcommand has an ``_add_<name>`` function that declares its flags and a ``_cmd_<name>``
handler that calls the Python API; the handlers stay thin so that scripts and the command line
do the same thing. User-caused problems arrive as :class:`~pipeline.errors.ElodinError` and are
printed as one line (``elodin: error: ...``) with exit status 2, never as a traceback.

Modules: :mod:`.app` (the parser, :func:`main`), :mod:`._common` (the flags many share),
:mod:`.models`, :mod:`.fingerprint` (``fingerprint``, ``demo``, ``run``), :mod:`.analysis`
(``reduce`` to ``crossmatch``), :mod:`.views` (``report``, ``explore``) and :mod:`.stores`
(``unlock``, ``upgrade``). ``python -m pipeline.cli`` runs :func:`main` (``__main__.py``).
"""

from __future__ import annotations

from ._common import _hdu as _hdu
from .app import build_parser as build_parser
from .app import main

__all__ = ["main"]
