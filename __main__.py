"""``python -m qrobust`` (and ``torchrun -m qrobust score ...``): the ``qrobust`` command."""
import sys

from qrobust.shared.cli import main

sys.exit(main())
