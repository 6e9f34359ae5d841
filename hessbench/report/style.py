"""A stable look for every estimator, and the orderings every table and figure share.

Each registered estimator has a fixed colour and marker (:data:`ESTIMATOR_STYLES`),
the same in every figure of every run; any other name (a plugin, a peer
implementation) gets one derived from a CRC-32 of its name, so it is stable
too. Labels of one estimator that differ in more than ``num_samples`` (such as
``bl89[output_curvature=zero]``) are told apart by a *variant* index: hatch
pattern on bars, hollow markers and dashed lines. Labels that differ only in
``num_samples`` (a Monte-Carlo sweep) are told apart by shade: the fewest
samples lightest, the most in full colour.

Matplotlib settings are fixed (:data:`RC`, applied over matplotlib's defaults,
ignoring any ``matplotlibrc``), so figures do not depend on the machine's
configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

__all__ = [
    "ESTIMATOR_STYLES",
    "OPTIMIZER_STYLES",
    "RC",
    "LabelInfo",
    "Style",
    "estimator_style",
    "figure_context",
    "label_infos",
    "natural_key",
    "optimizer_style",
    "sweeps",
]


@dataclass(frozen=True)
class Style:
    """A colour (hex) and a matplotlib marker."""

    colour: str
    marker: str


# The 15 registered estimators, in the order tables and figures list them.
ESTIMATOR_STYLES: dict[str, Style] = {
    "exact": Style("#222222", "*"),
    "hesscale": Style("#1f77b4", "o"),
    "hesscale_gn": Style("#17becf", "s"),
    "bl89": Style("#2ca02c", "^"),
    "ggn_exact": Style("#9467bd", "D"),
    "ggn_mc": Style("#8c564b", "d"),
    "kfac": Style("#e377c2", "P"),
    "hutchinson": Style("#d62728", "v"),
    "adahessian": Style("#ff7f0e", "<"),
    "xdiag": Style("#e6550d", "H"),
    "diagpp": Style("#5254a3", "8"),
    "sophia_gnb": Style("#393b79", ">"),
    "efisher": Style("#637939", "h"),
    "grad_sq": Style("#bcbd22", "X"),
    "zero": Style("#9a9a9a", "p"),
}
_FALLBACK_COLOURS = (
    "#843c39", "#7b4173", "#5254a3", "#8ca252", "#bd9e39", "#ad494a", "#a55194",
    "#6b6ecf", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#ce6dbd",
)  # fmt: skip
_FALLBACK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "d", "p", "H", "8")
HATCHES = ("", "//", "..", "xx", "\\\\", "++")
LINESTYLES = ("-", "--", ":", "-.")
MAX_SHADE = 0.55  # the smallest sample size of a sweep: 55 % of the way to white

RC = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.axisbelow": True,
    "hatch.linewidth": 0.6,
    "svg.hashsalt": "hessbench",
    "pdf.fonttype": 42,
    "path.simplify": False,
}


@contextlib.contextmanager
def figure_context() -> Iterator[None]:
    """Matplotlib's defaults plus :data:`RC`, whatever the local configuration says."""
    import matplotlib as mpl
    import matplotlib.style

    with mpl.rc_context(), matplotlib.style.context("default"):
        mpl.rcParams.update(RC)
        yield


def estimator_style(name: str) -> Style:
    """The fixed style of a registered estimator, or a stable one derived from the name."""
    if name in ESTIMATOR_STYLES:
        return ESTIMATOR_STYLES[name]
    h = zlib.crc32(name.encode())
    return Style(
        _FALLBACK_COLOURS[h % len(_FALLBACK_COLOURS)],
        _FALLBACK_MARKERS[(h // len(_FALLBACK_COLOURS)) % len(_FALLBACK_MARKERS)],
    )


def natural_key(text: str) -> tuple:
    """Sort key with digit runs compared as numbers: ``L2`` before ``L16``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text))


def _order(name: str) -> tuple:
    names = list(ESTIMATOR_STYLES)
    return (names.index(name), "") if name in names else (len(names), name)


@dataclass(frozen=True)
class LabelInfo:
    """What the figures need to know about one estimator label."""

    label: str
    estimator: str
    variant: int  # index among the estimator's variants (parameters other than num_samples)
    num_samples: int | None
    sweep: str  # estimator plus its parameters other than num_samples
    style: Style
    swept: bool = False  # num_samples changes the estimate (a random estimator)
    shade: float = 0.0  # blend towards white: smaller sample sizes of a sweep are lighter

    @property
    def colour(self) -> str:
        """The estimator's colour, lightened by :attr:`shade` (sweeps' smaller sizes)."""
        rgb = [int(self.style.colour[i : i + 2], 16) for i in (1, 3, 5)]
        return "#" + "".join(f"{round(c + (255 - c) * self.shade):02x}" for c in rgb)

    @property
    def hatch(self) -> str:
        """Bar hatch for the variant."""
        return HATCHES[self.variant % len(HATCHES)]

    @property
    def linestyle(self) -> str:
        """Line style for the variant."""
        return LINESTYLES[self.variant % len(LINESTYLES)]

    @property
    def facecolour(self) -> str:
        """Marker face: filled for the first variant, hollow for the others."""
        return self.colour if self.variant == 0 else "white"


def label_infos(df: pd.DataFrame) -> dict[str, LabelInfo]:
    """Every label of the cell table, in display order (estimator order, then naturally).

    Reads what it needs to know about an estimator from the records' columns
    ``sample_param`` (the field a Monte-Carlo sweep varies), ``stochastic`` and
    ``default_params``; a table without them (records written before they were
    recorded) is treated as: ``num_samples`` counts samples, every estimator with
    it is random, no parameters are the defaults.
    """
    cols = ["label", "estimator", "params", "sample_param", "stochastic", "default_params"]
    first = df.drop_duplicates("label").reindex(columns=cols)
    rows = []
    for label, est, params, sample, random, default in first.itertuples(index=False):
        p = json.loads(params) if params else {}
        sample = sample if isinstance(sample, str) else "num_samples"
        k = p.pop(sample, None)
        k = k if isinstance(k, int) else None
        swept = k is not None and random is not False
        rows.append((str(label), str(est), k, p, swept, default is True))
    variants: dict[str, list[tuple[bool, str]]] = {}
    for _, est, _, p, _, default in rows:
        key = (not default, json.dumps(p, sort_keys=True))
        variants.setdefault(est, [])
        if key[1] not in [v for _, v in variants[est]]:
            variants[est].append(key)
    order = {est: [v for _, v in sorted(keys)] for est, keys in variants.items()}
    out = {}
    for label, est, k, p, swept, _ in sorted(rows, key=lambda r: (_order(r[1]), natural_key(r[0]))):
        key = json.dumps(p, sort_keys=True)
        sweep = est if not p else f"{est}[{','.join(f'{a}={b}' for a, b in sorted(p.items()))}]"
        out[label] = LabelInfo(
            label, est, order[est].index(key), k, sweep, estimator_style(est), swept=swept
        )
    for group in sweeps(out).values():  # lighter for fewer samples, full colour for the most
        sizes = sorted({i.num_samples or 0 for i in group})
        for info in group:
            rank = sizes.index(info.num_samples or 0)
            shade = MAX_SHADE * (1 - rank / (len(sizes) - 1))
            out[info.label] = dataclasses.replace(info, shade=shade)
    return out


def sweeps(infos: dict[str, LabelInfo]) -> dict[str, list[LabelInfo]]:
    """Monte-Carlo sample-size sweeps: labels that differ only in ``num_samples``.

    Keyed by the sweep's name (estimator and its other parameters), each sorted by
    ``num_samples``; only sweeps with at least two sizes. A deterministic estimator
    (K-FAC with exact backward factors) ignores ``num_samples`` and is no sweep.
    """
    groups: dict[str, list[LabelInfo]] = {}
    for info in infos.values():
        if info.swept:
            groups.setdefault(info.sweep, []).append(info)
    return {
        name: sorted(g, key=lambda i: i.num_samples or 0)
        for name, g in groups.items()
        if len({i.num_samples for i in g}) >= 2
    }


# Fixed colours: each Hessian-based preset takes its estimator's colour from the
# accuracy reports; step-size-scaled variants share their base's colour, dashed.
OPTIMIZER_STYLES: dict[str, Style] = {
    "adam": Style("#222222", "o"),
    "sgd": Style("#9a9a9a", "s"),
    "adam_equiv": estimator_style("grad_sq"),
    "adahessian": estimator_style("adahessian"),
    "adahesscale": estimator_style("hesscale"),
    "adahesscale_gn": estimator_style("hesscale_gn"),
    "sophia": estimator_style("sophia_gnb"),
    "sophia_h": estimator_style("hutchinson"),
}
_SCALED = ("_scaled", "-scaled")


def _base(name: str) -> tuple[str, bool]:
    for suffix in _SCALED:
        if name.endswith(suffix):
            return name[: -len(suffix)], True
    return name, False


def optimizer_style(name: str) -> tuple[Style, str]:
    """The colour and marker of an optimizer preset, and its line style.

    Step-size-scaled variants (``<preset>_scaled``) take their base preset's colour
    and a dashed line; unknown names get a stable colour derived from the name.
    """
    base, scaled = _base(name)
    style = OPTIMIZER_STYLES.get(base) or estimator_style(base)
    return style, "--" if scaled else "-"
