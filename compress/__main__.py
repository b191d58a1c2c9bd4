"""``python -m compress ...`` (and ``accelerate launch -m compress ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
