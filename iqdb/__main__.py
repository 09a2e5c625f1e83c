"""``python -m iqdb``: the command line (see :mod:`iqdb._cli`)."""

import sys

from ._cli import main

sys.exit(main())
