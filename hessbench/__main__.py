"""``python -m hessbench``: the same as the ``hessbench`` command."""

from hessbench.cli import console

console()
