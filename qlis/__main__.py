"""``python -m qlis``: the ``qlis`` command (also how ``torchrun -m qlis pack ...`` starts it)."""

from qlis.cli.main import main

main()
