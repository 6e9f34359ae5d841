"""The progress bar at 80 columns: the numbers stay, a long label is cut."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console

from hessbench.kinds.console import progress_bar

LONG = "mlp_deep_wide@trained1000/hutchinson[num_samples=50,distribution=rademacher]/seed=12"


@pytest.mark.parametrize("width", [60, 80, 120])
def test_count_rate_and_time_left_stay_visible(width):
    buf = StringIO()
    console = Console(width=width, file=buf, force_terminal=False)
    progress = progress_bar(console, "cell")
    task = progress.add_task("cells", total=1234, cell=LONG)
    progress.update(task, advance=1000)
    console.print(progress.get_renderable())
    (line,) = buf.getvalue().splitlines()
    assert len(line) <= width
    assert "1000/1234" in line
    assert re.search(r"(- s/it|[\d.]+ (s/it|it/s))", line)
    assert re.search(r"(-:--:--|\d+:\d\d:\d\d)", line)
    assert line.rstrip().endswith("…")  # the label is what gets cut
    assert LONG[:10] in line


def test_a_short_label_is_shown_whole():
    buf = StringIO()
    console = Console(width=80, file=buf, force_terminal=False)
    progress = progress_bar(console, "cell")
    progress.add_task("cells", total=4, cell="tiny/zero/seed=0")
    console.print(progress.get_renderable())
    assert buf.getvalue().rstrip().endswith("tiny/zero/seed=0")
