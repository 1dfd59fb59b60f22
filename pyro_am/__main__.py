"""Run the ``pyro-am`` command as ``python -m pyro_am`` (the form ``torchrun -m`` needs)."""

import sys

from pyro_am.cli import main

sys.exit(main())
