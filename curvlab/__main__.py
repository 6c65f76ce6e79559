"""``python -m curvlab``: the same as the ``curvlab`` command."""

import sys

from curvlab.cli import main

sys.exit(main())
