"""``python -m qconv``: the same as the ``qconv`` command."""

from qconv.cli import main

main()
