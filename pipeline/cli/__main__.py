"""``python -m pipeline.cli``: the ``elodin`` command."""

import sys

from .app import main

sys.exit(main())
