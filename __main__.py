"""``python -m qrobust`` (and ``torchrun -m qrobust score ...``): the ``qrobust`` command."""
import sys

from qrobust.cli import main

sys.exit(main())
