"""``python -m adapterd.cli``: the ``adapterd`` command."""

import sys

from . import main

sys.exit(main())
