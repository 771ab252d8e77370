"""``python -m unimerge``: the ``unimerge`` command."""

from unimerge.cli import main

main()
