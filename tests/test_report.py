"""Reports (tables, figures, pages) and run comparison, on one small real run."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from hessbench.cli import app
from hessbench.report import accuracy_table, compare, cost_table, make_figures
from hessbench.report.document import slug
from hessbench.report.page import OUTPUTS, render_report
from hessbench.report.plotting import ROUNDING, coinciding
from hessbench.report.style import ESTIMATOR_STYLES, estimator_style, label_infos, sweeps
from hessbench.report.table import uniform_columns
from hessbench.run.runner import RunOptions, run_suite
from hessbench.store.records import load, load_parts

# tiny: 4 parameters, so `exact` with max_params 5 runs; mlp (43 parameters) makes it
# unsupported. mlp is evaluated at init and after 20 steps (the before/after figure);
# the two sizes give the cost-against-parameters figure; the sweeps the samples figure
# (hutchinson sweeps num_matvecs: the matrix-free budget figures and table too).
SUITE = textwrap.dedent("""
    name: reptest
    description: Two tiny tasks for the report tests.
    defaults:
      seeds: [0, 1]
      timeout_s: 120
      timing: {warmup: 0, min_repeats: 1, max_repeats: 1, min_time_s: 0.001}
    tasks:
      - name: tiny
        model:
          kind: sequential
          layers:
            - {type: Linear, args: [2, 1], kwargs: {bias: false}}
            - {type: Tanh}
            - {type: Linear, args: [1, 2], kwargs: {bias: false}}
        loss: {kind: mse}
        data: {kind: synthetic, input_shape: [2], output_dim: 2}
        eval: {batch_size: 1, num_batches: 2}
      - name: mlp
        model: {kind: mlp, widths: [5], activation: tanh}
        loss: {kind: cross_entropy}
        data: {kind: synthetic, input_shape: [4], num_classes: 3, size: 64}
        eval:
          batch_size: 2
          num_batches: 2
          states: [init, {steps: 20, batch_size: 8}]
    estimators:
      - name: exact
        params: {method: hvp, max_params: 5}
      - name: hesscale
      - name: zero
      - name: hutchinson
        params: {num_matvecs: [1, 4]}
      - name: ggn_mc
        params: {num_samples: [1, 4]}
""")
FIGURES = [
    "l1_over_hesscale",
    "layer_error",
    "accuracy_vs_cost",
    "error_vs_samples",
    "error_vs_matvecs",
    "error_vs_matvec_time",
    "cost_vs_params",
    "memory",
    "before_after_training",
]
UNSUPPORTED = "mlp@init/exact/seed=0"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report_run")
    suite = tmp / "reptest.yaml"
    suite.write_text(SUITE)
    out = tmp / "run"
    run_suite(suite, RunOptions(output=out))
    return out


@pytest.fixture(scope="module")
def frames(run_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    return load(run_dir), load_parts(run_dir)


@pytest.fixture(scope="module")
def figures(frames) -> dict:
    return {f.name: f for f in make_figures(*frames)}


@pytest.fixture(scope="module")
def report_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "r"
    result = CliRunner().invoke(app, ["report", str(run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, na_values=["-"], keep_default_na=False)


def bar_values(fig) -> dict[tuple[str, str], float]:
    """(panel title, bar gid) -> the value where the bar ends."""
    return {
        (ax.get_title(), p.get_gid()): p.get_x() + p.get_width()
        for ax in fig.axes
        for p in ax.patches
        if p.get_gid()
    }


def test_the_run_has_what_the_report_needs(frames):
    df, _ = frames
    assert set(df["task"]) == {"tiny", "mlp@init", "mlp@trained20"}
    assert set(df.loc[df["status"] != "ok", "cell_id"]) == {
        f"mlp@{s}/exact/seed={k}" for s in ("init", "trained20") for k in (0, 1)
    }
    assert (df.loc[df["status"] != "ok", "status"] == "unsupported").all()


def test_report_writes_every_table_and_figure(report_dir):
    written = {str(p.relative_to(report_dir)) for p in report_dir.rglob("*") if p.is_file()}
    assert written == set(OUTPUTS)  # every figure applies to this run
    for name in written:
        assert (report_dir / name).stat().st_size > 0, name
    for name in FIGURES:
        with Image.open(report_dir / "figures" / f"{name}.png") as img:
            assert min(img.size) > 200, (name, img.size)
        assert (report_dir / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    page = (report_dir / "report.md").read_text()
    html = (report_dir / "index.html").read_text()
    for name in FIGURES:
        assert f"](figures/{name}.png)" in page
        assert f'src="figures/{name}.png"' in html
    for table in ("accuracy", "cost", "layers", "matvec_budget"):
        assert f"(tables/{table}.csv)" in page
        assert f'href="tables/{table}.tex"' in html
    assert "reptest" in page
    assert "Two tiny tasks for the report tests." in page
    assert "hessbench report " in page
    assert "torch" in page
    assert "git commit" in page
    assert "Not drawn" not in page


def test_table_cells_equal_the_dataframe(report_dir, frames):
    df, parts = frames
    ok = df[df["status"] == "ok"]
    acc = read_csv(report_dir / "tables" / "accuracy.csv").set_index(["task", "estimator"])
    g = ok[(ok["task"] == "mlp@init") & (ok["label"] == "hutchinson[num_matvecs=4]")]
    row = acc.loc[("mlp@init", "hutchinson[num_matvecs=4]")]
    assert row["rel_l1_median"] == g["rel_l1"].median()
    assert row["rel_l1_q25"] == g["rel_l1"].quantile(0.25)
    assert row["l1_over_hesscale_median"] == g["l1_over_hesscale"].median()
    assert len(acc) == df[["task", "label"]].drop_duplicates().shape[0]

    cost = read_csv(report_dir / "tables" / "cost.csv").set_index(["task", "estimator"])
    g = ok[(ok["task"] == "tiny") & (ok["label"] == "ggn_mc[num_samples=1]")]
    assert cost.loc[("tiny", "ggn_mc[num_samples=1]"), "cpu_time_ratio_median"] == pytest.approx(
        g["cpu_time_ratio"].median(), rel=1e-15
    )
    assert cost.loc[("tiny", "ggn_mc[num_samples=1]"), "memory_ratio_median"] == pytest.approx(
        g["memory_ratio"].median(), rel=1e-15
    )

    layers = read_csv(report_dir / "tables" / "layers.csv").set_index(["task", "estimator"])
    p = parts[(parts["level"] == "layer") & (parts["label"] == "hesscale")]
    p = p[p["task"] == "mlp@trained20"]
    for name, values in p.groupby("name"):
        got = layers.loc[("mlp@trained20", "hesscale"), f"layer {name}"]
        assert got == values["rel_l1"].median()

    md = (report_dir / "tables" / "accuracy.md").read_text()
    med = ok[(ok["task"] == "tiny") & (ok["label"] == "hesscale")]["rel_l1"].median()
    assert f"| tiny | hesscale | 2/2 | {med:.3g} |" in md


def test_unsupported_cells_show_a_dash_and_the_reason(report_dir, frames):
    df, _ = frames
    message = df.set_index("cell_id").loc[UNSUPPORTED, "message"]
    assert message
    for table in ("accuracy", "cost", "layers"):
        md = (report_dir / "tables" / f"{table}.md").read_text()
        row = next(line for line in md.splitlines() if line.startswith("| mlp@init | exact |"))
        assert "| 0/2 | -¹ |" in row, row
        assert f"1. unsupported: {message}"[:40] in md.replace("\\", "")
        tex = (report_dir / "tables" / f"{table}.tex").read_text()
        assert r"--\textsuperscript{1}" in tex
        assert r"\textsuperscript{1} unsupported: " in tex
        csv = read_csv(report_dir / "tables" / f"{table}.csv").set_index(["task", "estimator"])
        row = csv.loc[("mlp@init", "exact")]
        assert row["seeds_ok"] == 0
        assert row["note"].startswith("unsupported: ")
        assert row.drop(["seeds_ok", "seeds", "note"]).isna().all()
    html = (report_dir / "index.html").read_text()
    assert "-<sup>1</sup>" in html
    assert "<li>unsupported: " in html


def test_a_partly_failed_label_keeps_its_value_and_marks_the_count(frames):
    df, _ = frames
    df = df.copy()
    i = df.index[df["cell_id"] == "tiny/hesscale/seed=1"][0]
    df.loc[i, ["status", "message"]] = ["error", "RuntimeError: boom"]
    # as results.load does: no ok hesscale cell, no L1 / HesScale for that task and seed
    df.loc[(df["task"] == "tiny") & (df["seed"] == 1), "l1_over_hesscale"] = float("nan")
    table = accuracy_table(df)
    md = table.markdown()
    row = next(line for line in md.splitlines() if line.startswith("| tiny | hesscale |"))
    n = table.notes.index("error: RuntimeError: boom") + 1
    assert row.startswith(f"| tiny | hesscale | 1/2{'⁰¹²³⁴⁵⁶⁷⁸⁹'[n]} |")
    value = df[df["cell_id"] == "tiny/hesscale/seed=0"]["rel_l1"].iloc[0]
    assert f"| {value:.3g} |" in row
    assert f"{n}. error: RuntimeError: boom" in md
    # the other labels of tiny lose seed 1's L1 / HesScale, and say so
    row = next(line for line in md.splitlines() if line.startswith("| tiny | zero |"))
    n = next(i for i, t in enumerate(table.notes, 1) if t.startswith("for some seeds: no ok hess"))
    marks = "".join(c for c in row.split("|")[-2] if c in "⁰¹²³⁴⁵⁶⁷⁸⁹˒").split("˒")
    assert "⁰¹²³⁴⁵⁶⁷⁸⁹"[n] in marks, row
    # on tiny (one hidden unit, MSE) HesScale is exact: its ratios are marked as rounding
    r = next(i for i, t in enumerate(table.notes, 1) if "at rounding level" in t)
    assert "⁰¹²³⁴⁵⁶⁷⁸⁹"[r] in marks, row


def test_figure_bars_equal_the_tables(frames, figures):
    df, _ = frames
    figs = figures
    assert all(f.figure is not None for f in figs.values()), {n: f.skipped for n, f in figs.items()}
    acc = accuracy_table(df).data.set_index(["task", "estimator"])
    bars = bar_values(figs["l1_over_hesscale"].figure)
    ok = df[(df["status"] == "ok") & df["l1_over_hesscale"].notna()]
    assert len(bars) == ok[["task", "label"]].drop_duplicates().shape[0]
    hs = df[(df["label"] == "hesscale") & (df["status"] == "ok")].set_index(["task", "seed"])
    for (task, label), v in bars.items():
        # the bar is the papers' statistic the table shows: mean L1 / HesScale's mean L1
        assert v == pytest.approx(acc.loc[(task, label), "l1_ratio_of_means"], rel=1e-12)
        cells = ok[(ok["task"] == task) & (ok["label"] == label)]
        ref = [hs.loc[(task, s), "l1"] for s in cells["seed"]]
        assert v == pytest.approx(cells["l1"].mean() / np.mean(ref), rel=1e-12)
    assert bars[("tiny", "hesscale")] == 1.0

    cost = cost_table(df).data.set_index(["task", "estimator"])
    bars = bar_values(figs["memory"].figure)
    assert ("mlp@init", "exact") not in bars
    for (task, label), v in bars.items():
        assert v == pytest.approx(cost.loc[(task, label), "memory_ratio_median"], rel=1e-12)

    bars = bar_values(figs["before_after_training"].figure)
    assert {k[1].split("|")[0] for k in bars} == {"init", "trained20"}
    for (base, gid), v in bars.items():
        state, label = gid.split("|")
        want = acc.loc[(f"{base}@{state}", label), "rel_l1_median"]
        assert v == pytest.approx(want, rel=1e-12)


def test_figures_are_labelled(figures):
    for f in figures.values():
        axes = [ax for ax in f.figure.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        assert all(ax.get_xlabel() for ax in axes), f.name
        assert all(ax.get_title() for ax in axes), f.name
        assert any(
            ax.get_ylabel() or any(t.get_text() for t in ax.get_yticklabels()) for ax in axes
        ), f.name
        assert f.title
        assert f.caption


def test_reports_are_deterministic_and_replace_stale_files(run_dir, report_dir, tmp_path):
    again = tmp_path / "again"
    (again / "figures").mkdir(parents=True)
    (again / "figures" / "memory.png").write_bytes(b"stale")
    (again / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["report", str(run_dir), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert (again / "notes.txt").read_text() == "mine"  # not ours: left alone
    for name in OUTPUTS:
        if name.endswith((".md", ".html")) and "/" not in name:
            continue  # the page names the output folder
        a, b = (report_dir / name).read_bytes(), (again / name).read_bytes()
        if name.endswith(".png") and a != b:  # at least the same pixels
            pa, pb = (np.asarray(Image.open(io.BytesIO(x))) for x in (a, b))
            assert np.array_equal(pa, pb), name
        else:
            assert a == b, name
    page = (again / "report.md").read_text()
    assert page == (report_dir / "report.md").read_text().replace(str(report_dir), str(again))


def test_skipped_figures_are_named_on_the_page(frames):
    df, parts = frames
    df = df[df["task"] == "tiny"]
    rep = render_report(df, parts[parts["task"] == "tiny"], {"suite": "x"}, "cmd", formats=())
    skipped = {f.name for f in rep.figures if f.figure is None}
    assert skipped == {"cost_vs_params", "before_after_training"}
    page = rep.files["report.md"].decode()
    assert "*Not drawn: every task has the same number of parameters (4)" in page
    assert "*Not drawn: the suite evaluates no task both at init and after training.*" in page
    assert "](figures/memory.png)" in page
    assert "figures/cost_vs_params.png" not in page


def test_report_of_a_missing_folder_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "hessbench: error:" in result.output
    assert "Traceback" not in result.output


def test_style_is_fixed_per_estimator(frames):
    from hessbench.estimators import available_estimators

    ours = {n for n in available_estimators() if "." not in n and not n.startswith("test_")}
    assert ours == set(ESTIMATOR_STYLES)
    styles = list(ESTIMATOR_STYLES.values())
    assert len({s.colour for s in styles}) == len({s.marker for s in styles}) == 15
    assert estimator_style("hesscale").colour == "#1f77b4"
    assert estimator_style("backpack.kfac") == estimator_style("backpack.kfac")
    df, _ = frames
    infos = label_infos(df)
    assert list(infos)[:3] == ["exact", "hesscale", "ggn_mc[num_samples=1]"]
    assert {k: [i.num_samples for i in v] for k, v in sweeps(infos).items()} == {
        "ggn_mc": [1, 4],
        "hutchinson": [1, 4],
    }


def cli_compare(a: Path, b: Path, *extra: str):
    return CliRunner().invoke(app, ["compare", str(a), str(b), *extra])


def test_compare_a_run_with_itself(run_dir):
    result = cli_compare(run_dir, run_dir)
    assert result.exit_code == 0, result.output
    assert "0 worse, 0 better" in result.output
    assert "not judged on time" in result.output  # timed once: no spread


def test_compare_flags_a_worse_cell(run_dir, tmp_path):
    doctored = tmp_path / "b"
    shutil.copytree(run_dir, doctored)
    lines = (doctored / "cells.jsonl").read_text().splitlines()
    target = "mlp@trained20/hutchinson[num_matvecs=4]/seed=1"
    out = []
    for line in lines:
        rec = json.loads(line)
        if rec["cell_id"] == target:
            rec["rel_l1"] *= 2
        if rec["cell_id"] == "tiny/hesscale/seed=1":
            rec.update(status="error", message="RuntimeError: boom")
        if rec["cell_id"] != "tiny/zero/seed=0":  # a cell only in A
            out.append(json.dumps(rec))
    (doctored / "cells.jsonl").write_text("\n".join(out) + "\n")
    result = cli_compare(run_dir, doctored)
    assert result.exit_code == 1, result.output
    assert target in result.output
    assert "worse" in result.output
    assert "only in A (1 cells):\n  tiny/zero/seed=0" in result.output
    assert "tiny/hesscale/seed=1" in result.output
    assert "2 worse" in result.output
    # the other way round it got better
    result = cli_compare(doctored, run_dir)
    assert result.exit_code == 0, result.output
    assert "2 better" in result.output
    assert "only in B (1 cells)" in result.output
    # accuracy is compared exactly, whatever the factor; only a wider --tol hides it
    result = cli_compare(run_dir, doctored, "--factor", "2.5")
    assert "2 worse" in result.output
    result = cli_compare(run_dir, doctored, "--tol", "0.6")
    assert result.exit_code == 1
    assert "1 worse" in result.output
    assert target not in result.output


def test_compare_counts_status_changes(frames):
    df, _ = frames
    b = df.copy()
    b.loc[b["cell_id"] == "tiny/hesscale/seed=0", "status"] = "error"
    b.loc[b["cell_id"] == UNSUPPORTED, "status"] = "ok"
    res = compare(df, b)
    verdicts = {c.cell_id: c.verdict for c in res.changes}
    assert verdicts == {"tiny/hesscale/seed=0": "worse", UNSUPPORTED: "better"}
    with pytest.raises(ValueError, match="factor"):
        compare(df, b, factor=1.0)


def test_report_defaults_to_the_run_folder_not_the_committed_reports(
    run_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where `reports/<suite>` used to be written
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report" / "report.md").is_file()
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("kind", ["train", "rl"])
def test_train_and_rl_reports_default_to_the_run_folder(kind, tmp_path, monkeypatch):
    import hessbench.rl.report
    import hessbench.train.report
    from hessbench.rl.cli import rl_report_command
    from hessbench.train.cli import train_report_command

    run = tmp_path / "run"
    run.mkdir()
    (run / "metadata.json").write_text(json.dumps({"kind": kind, "suite": "s"}))
    written = []

    def render(run_dir, out):
        written.append(Path(out))
        return type("R", (), {"figures": [], "tables": []})()

    monkeypatch.setattr(hessbench.train.report, "render_train_report", render)
    monkeypatch.setattr(hessbench.rl.report, "render_rl_report", render)
    command = {"train": train_report_command, "rl": rl_report_command}[kind]
    assert command(run) == 0
    assert command(run, tmp_path / "reports" / "s") == 0
    assert written == [run / "report", tmp_path / "reports" / "s"]


# --- pages: what a browser gets (tests/test_report_browser.py renders them) ----------------


def _ids_and_links(page: str) -> tuple[set[str], list[str]]:
    return set(re.findall(r' id="([^"]+)"', page)), re.findall(r'href="#([^"]+)"', page)


def test_pages_have_a_viewport_contents_and_a_link_to_the_index(report_dir):
    page = (report_dir / "index.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert '<a href="../index.html">↑ All reports</a>' in page
    assert '<meta name="hessbench-kind" content="accuracy">' in page
    ids, links = _ids_and_links(page)
    # the contents link every section, figure and table, and every link has its target
    assert {"environment", "figures", "tables", "accuracy", "cost"} <= set(links)
    assert sum(link.startswith(("1-", "2-", "3-", "4-", "5-", "6-", "7-")) for link in links) == 7
    assert set(links) <= ids
    md = (report_dir / "report.md").read_text()
    for title, anchor in re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", md):
        assert slug(title) == anchor  # GitHub's anchor of the heading it names
        assert f"\n## {title}\n" in md or f"\n### {title}\n" in md


def test_tables_scroll_in_their_box_and_numbers_do_not_wrap(report_dir):
    page = (report_dir / "index.html").read_text()
    assert (
        page.count("<table") == page.count('<div class="scroll"><table') == 5
    )  # env + 4 (matvec_budget: hutchinson sweeps num_matvecs)
    assert ".scroll{overflow-x:auto" in page
    assert re.search(r"td\.num\{[^}]*white-space:nowrap", page)


def _notation(cell: str) -> str | None:
    tokens = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", cell)
    kinds = {"e" in t for t in tokens if float(t) != 0}
    assert len(kinds) <= 1, cell
    return None if not kinds else "scientific" if kinds.pop() else "positional"


@pytest.mark.parametrize("name", ["accuracy", "cost", "layers"])
def test_each_column_writes_its_numbers_one_way(report_dir, name):
    lines = (report_dir / "tables" / f"{name}.md").read_text().splitlines()
    rows = [line.strip("|").split("|") for line in lines[2:] if line.startswith("| ")]
    for c in range(3, len(rows[0])):
        cells = [r[c].strip().rstrip("⁰¹²³⁴⁵⁶⁷⁸⁹˒") for r in rows]
        kinds = {_notation(x) for x in cells if x not in ("", "-")} - {None}
        assert len(kinds) <= 1, (name, c, cells)


def test_uniform_columns():
    rows = [
        ["a", "1.76e+03", "0.1–0.5", "3/3"],
        ["b", "358", "2e-08–0.3", "2/3"],
        ["c", "2.54e-07", "0.99–1", "-"],
    ]
    assert uniform_columns(rows, keys=1) == [
        ["a", "1.76e+03", "1.0e-01–5.0e-01", "3/3"],
        ["b", "3.58e+02", "2.0e-08–3.0e-01", "2/3"],
        ["c", "2.54e-07", "9.9e-01–1.0e+00", "-"],
    ]
    # a column within a few decades stays positional, keeping each number's digits
    assert uniform_columns([["x", "1.76e+03"], ["y", "0.5"], ["z", "-"]], keys=1) == [
        ["x", "1760"],
        ["y", "0.5"],
        ["z", "-"],
    ]
    assert uniform_columns([["1.2 (0.3 to 4)", "lr 0.01 *"]]) == [["1.2 (0.3 to 4)", "lr 0.01 *"]]


def test_figures_fit_the_page_and_say_what_to_read(report_dir, figures):
    for name in FIGURES:
        with Image.open(report_dir / "figures" / f"{name}.png") as img:
            # at most 8.5 in at 150 dpi (bbox_inches="tight" may add a little): shown at
            # 880 px (GitHub) or more, 8-point text stays at least 10 px tall
            assert img.size[0] <= 1300, (name, img.size)
    page = (report_dir / "index.html").read_text()
    for f in figures.values():
        assert f.read.endswith(".")
        assert f.caption
        src = f'<img src="figures/{f.name}.png"'
        # under the image: what to read, then the caption with the notes
        block = page[page.index(src) : page.index("</figure>", page.index(src))]
        assert f'<p class="read">What to read: {html.escape(f.read)}</p>' in block
        assert all(html.escape(n) in block for n in f.notes)


def test_rounding_level_errors_do_not_stretch_the_axes(frames, figures):
    df, _ = frames
    ok = df[df["status"] == "ok"]
    tiny = ok[ok["task"] == "tiny"].groupby("label")["rel_l1"].median()
    low, rest = tiny[tiny < ROUNDING], tiny[tiny >= ROUNDING]
    assert "exact" in low.index
    assert len(rest)
    ax = next(a for a in figures["accuracy_vs_cost"].figure.axes if a.get_title() == "tiny")
    bottom = ax.get_ylim()[0]
    assert bottom >= rest.min() / 10 / 1.01  # not down at exact's 1e-8
    for label in low.index:  # drawn on the floor line
        (dot,) = [line for line in ax.lines if line.get_gid() == label]
        assert dot.get_ydata()[0] == pytest.approx(bottom * 1.6)
    assert any("exact" in n and "rounding" in n for n in figures["accuracy_vs_cost"].notes)


def test_the_layer_figure_is_a_heatmap_per_task(frames, figures):
    _, parts = frames
    fig = figures["layer_error"].figure
    images = {im.get_gid(): im for ax in fig.axes for im in ax.get_images()}
    tasks = set(parts.loc[parts["level"] == "layer", "task"])
    assert set(images) == tasks
    assert not any(ax.lines for ax in fig.axes)  # no line per estimator


def _sweep_cells(values: dict[str, dict[int, float]]) -> pd.DataFrame:
    """Cells of one task: per estimator and k the given relative L1 error, three seeds."""
    rows = []
    for est, by_k in values.items():
        for k, v in by_k.items():
            for seed in range(3):
                rows.append(
                    {
                        "cell_id": f"t/{est}[k={k}]/seed={seed}",
                        "task": "t",
                        "estimator": est,
                        "label": f"{est}[num_samples={k}]",
                        "params": json.dumps({"num_samples": k}),
                        "seed": seed,
                        "status": "ok",
                        "rel_l1": v,
                        "stochastic": True,
                        "sample_param": "num_samples",
                        "default_params": False,
                    }
                )
    return pd.DataFrame(rows)


def test_error_vs_samples_names_coinciding_and_flat_curves():
    from hessbench.report.figures_lines import samples_figure

    df = _sweep_cells(
        {
            "ggn_mc": {1: 1.1, 50: 0.8},
            "kfac": {1: 1.1, 50: 0.8},  # the same curve: drawn over ggn_mc
            "hutchinson": {1: 35.0, 50: 4.9},  # falls as 1/sqrt(k)
            "adahessian": {1: 35.0, 50: 34.8},  # flat: bias
        }
    )
    r = samples_figure(df)
    assert r.figure is not None
    notes = " ".join(r.notes)
    assert "ggn_mc and kfac coincide (equal within 0.1%): one is hidden behind the other." in notes
    assert "adahessian stays flat (t: 35 at k=1, 35 at k=50)" in notes
    assert "its error is bias, not variance. AdaHessian averages |z ∘ Hz|" in notes
    assert "hutchinson stays flat" not in notes


def test_coinciding_curves():
    curves = [("a", [1, 2], [1.0, 2.0]), ("b", [1, 2], [1.0, 2.0005]), ("c", [1, 2], [1.0, 2.1])]
    assert coinciding(curves) == [("a", "b")]
    assert coinciding([("a", [1, 2], [1.0, 2.0]), ("b", [1, 3], [1.0, 2.0])]) == []


def _fake_report(folder: Path, title: str, description: str) -> None:
    folder.mkdir(parents=True)
    (folder / "report.md").write_text(f"# {title}\n\n> {description}\n\nMade by ...\n")


def test_the_index_links_every_report(report_dir, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(report_dir, reports / "reptest")
    _fake_report(reports / "rl_old", "hessbench RL report: rl_old", "An rl run.")
    _fake_report(reports / "train_old", "hessbench training report: train_old", "A | b.")
    (reports / "not_a_report").mkdir()
    result = CliRunner().invoke(app, ["report", "--index", str(reports)])
    assert result.exit_code == 0, result.output
    assert f"index: {reports / 'index.html'} (3 reports)" in result.output
    page = (reports / "index.html").read_text()
    assert '<meta name="viewport"' in page
    assert "All reports" not in page
    links = re.findall(r'<a href="([^"#]+)">', page)
    assert links == ["reptest/index.html", "train_old/report.md", "rl_old/report.md"]
    for link in links:
        assert (reports / link).is_file()
    assert "Two tiny tasks for the report tests." in page  # each report's description
    assert page.index("Accuracy of") < page.index("(training)") < page.index("(reinforcement")
    again = (reports / "index.html").read_bytes()
    CliRunner().invoke(app, ["report", "--index", str(reports)])
    assert (reports / "index.html").read_bytes() == again  # deterministic
    result = CliRunner().invoke(app, ["report", "--index", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "not a folder" in result.output
