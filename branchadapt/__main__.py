"""``python -m branchadapt`` is the ``branchadapt`` command."""

import sys

from .cli import main

sys.exit(main())
