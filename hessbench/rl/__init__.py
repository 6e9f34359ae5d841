"""Reinforcement learning with hessbench's optimizers: A2C on gymnasium's classic control.

The ``rl`` suite kind (``docs/rl.md``): :mod:`hessbench.rl.schema` parses it,
:mod:`hessbench.rl.a2c` trains one run, :mod:`hessbench.rl.runner` runs a suite
into a run folder, :mod:`hessbench.rl.report` writes its report and
:mod:`hessbench.rl.cli` holds the command-line entry points. gymnasium is an
optional dependency: ``pip install 'hessbench[rl]'``.
"""
