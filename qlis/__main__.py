"""``python -m qlis``: the ``qlis`` command (also how ``torchrun -m qlis pack ...`` starts it)."""

from qlis.cli import main

main()
