"""Report pages as a browser shows them: headless Chromium at 1280 px and at phone width.

A report (the committed ``reports/paper_2022/results.csv``, three seeds) and the
index of its folder are rendered, then opened in Chromium inside two iframes, 1280
and 390 px wide (headless windows are at least 500 px wide, an iframe can be
narrower). A script added to a copy of the page measures it there and posts the
numbers to the frame page, which ``--dump-dom`` prints. Skipped where no Chromium
is installed (Debian: ``apt-get install -y chromium``). About 7 s.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from hessbench.report.index import write_index
from hessbench.report.page import render_report, write_files
from hessbench.report.results import read_results

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (Debian: apt-get install -y chromium); the browser checks need one",
)
WIDTHS = (1280, 390)
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)  # fmt: skip
SMALLEST_PT = 7  # the smallest text in a figure (notes, cell values), at 150 dpi

# Measures the page it is added to and posts the numbers to the frame page.
PROBE = """<script>
addEventListener("load", function () {
  var d = document.documentElement, inside = function (e) {
    return e.parentElement && e.parentElement.closest(".scroll"); };
  var lines = function (e) {
    var r = document.createRange(); r.selectNodeContents(e);
    return new Set([].map.call(r.getClientRects(), function (x) { return Math.round(x.top); })).size; };
  parent.postMessage(JSON.stringify({
    scrollWidth: d.scrollWidth, clientWidth: d.clientWidth,
    over: [].filter.call(document.querySelectorAll("body *"), function (e) {
      return !inside(e) && e.getBoundingClientRect().right > d.clientWidth + 0.5;
    }).map(function (e) { return e.tagName + ": " + e.textContent.slice(0, 60); }),
    boxes: [].map.call(document.querySelectorAll(".scroll"), function (e) {
      return [e.scrollWidth, e.clientWidth, e.getBoundingClientRect().right]; }),
    images: [].map.call(document.images, function (i) {
      return [i.getAttribute("src"), i.naturalWidth, i.getBoundingClientRect().width]; }),
    wrapped: [].filter.call(document.querySelectorAll("td.num"), function (e) {
      return lines(e) > 1; }).map(function (e) { return e.textContent; })
  }), "*");
});
</script>"""

FRAMES = """<!DOCTYPE html><html><body style="margin:0">
FRAMES<pre id="out"></pre><script>
var got = {};
addEventListener("message", function (ev) {
  [].forEach.call(document.querySelectorAll("iframe"), function (f) {
    if (f.contentWindow === ev.source) got[f.width] = JSON.parse(ev.data); });
  document.getElementById("out").textContent = JSON.stringify(got);
});
</script></body></html>"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    """A folder with one accuracy report (a part of paper_2022) and its index."""
    out = tmp_path_factory.mktemp("browser") / "reports"
    df, parts, meta = read_results(ROOT / "reports" / "paper_2022")
    df = df[df["seed"] < 3]
    parts = parts[parts["cell_id"].isin(df["cell_id"])]
    report = render_report(df, parts, meta, "hessbench report ... -o reports/p", formats=("png",))
    write_files(out / "paper_2022", report.files)
    write_index(out)
    return out


def _chromium(tmp: Path, *args: str) -> str:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def measure(page: Path, tmp: Path) -> dict[int, dict]:
    """The page's measurements at each of :data:`WIDTHS`, from one Chromium run."""
    probe = page.with_name(".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    frames = "".join(
        f'<iframe src="{probe.as_uri()}" width="{w}" height="900" style="border:0"></iframe>'
        for w in WIDTHS
    )
    frame = tmp / "frames.html"
    frame.write_text(FRAMES.replace("FRAMES", frames))
    try:
        dom = _chromium(tmp, "--window-size=1720,1000", "--virtual-time-budget=10000",
                        "--dump-dom", frame.as_uri())  # fmt: skip
    finally:
        probe.unlink()
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    got = json.loads(html.unescape(found.group(1))) if found else {}
    assert set(got) == {str(w) for w in WIDTHS}, dom[-2000:]
    return {int(w): m for w, m in got.items()}


@pytest.fixture(scope="module")
def measured(reports, tmp_path_factory) -> dict[str, dict[int, dict]]:
    tmp = tmp_path_factory.mktemp("chromium")
    return {name: measure(reports / name, tmp) for name in ("paper_2022/index.html", "index.html")}


@pytest.mark.parametrize("page", ["paper_2022/index.html", "index.html"])
@pytest.mark.parametrize("width", WIDTHS)
def test_the_page_fits_the_window(measured, page, width):
    m = measured[page][width]
    assert m["clientWidth"] == width  # no scroll bars hidden: the full width
    assert m["scrollWidth"] <= m["clientWidth"], m["over"]  # nothing to scroll sideways
    assert m["over"] == []
    for _, client_width, right in m["boxes"]:  # a wide table scrolls in its box
        assert right <= width + 0.5
        assert client_width <= width


def test_wide_tables_scroll_inside_their_box_at_phone_width(measured):
    boxes = measured["paper_2022/index.html"][390]["boxes"]
    assert len(boxes) == 4  # environment and the three tables
    assert any(scroll > client for scroll, client, _ in boxes)  # wider than a phone...
    assert measured["paper_2022/index.html"][390]["scrollWidth"] <= 390  # ...the page is not


@pytest.mark.parametrize("width", WIDTHS)
def test_numbers_never_wrap(measured, width):
    assert measured["paper_2022/index.html"][width]["wrapped"] == []


def test_figure_text_is_readable_at_desktop_width(measured):
    images = measured["paper_2022/index.html"][1280]["images"]
    assert len(images) == 5
    for src, natural, shown in images:
        # text of SMALLEST_PT points is SMALLEST_PT / 72 * 150 pixels in the PNG
        assert SMALLEST_PT / 72 * 150 * shown / natural >= 10, (src, natural, shown)


def test_a_screenshot_has_the_page_within_the_window(reports, tmp_path):
    shot = tmp_path / "shot.png"
    page = (reports / "paper_2022" / "index.html").as_uri()
    _chromium(tmp_path, "--window-size=1280,900", f"--screenshot={shot}", page)
    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        rgb = img.convert("RGB")
        # the content is centred at most 1200 px wide: the right margin stays blank
        assert rgb.crop((1250, 0, 1280, 900)).getcolors() == [(30 * 900, (255, 255, 255))]
        assert len(rgb.crop((0, 0, 1200, 900)).getcolors(1 << 24)) > 2  # something is drawn
