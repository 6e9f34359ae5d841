"""pytest-benchmark micro-benchmarks: one torch thread, the repository root importable.

Run with ``python -m pytest benchmarks/micro --benchmark-only`` (docs/benchmarks.md).
They are not part of the normal test run (``testpaths`` is ``tests`` and ``hessbench``).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for benchmarks._problems
torch.set_num_threads(1)
