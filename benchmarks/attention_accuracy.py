"""HesScale-family accuracy at attention: rel. L1 against ``exact`` on TinyGPT and two MLPs.

Usage::

    python benchmarks/attention_accuracy.py [--seeds 10]

float64, batch 1, cross-entropy, at init; mean over seeds of
``sum |h_est - h| / sum |h|`` over all parameters (and, for TinyGPT's HesScale, per
parameter group). The numbers are quoted in docs/estimators.md (transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hessbench.estimators import get_estimator
from hessbench.suite.architectures import ResidualMLP, TinyGPT

NAMES = ("hesscale", "hesscale_gn", "bl89", "ggn_exact")
GROUPS = ("embed", "pos", "in_proj", "out_proj", "linear1", "linear2", "norm", "head")


def _rel(est, want, keys) -> float:
    return float(
        sum((est[k] - want[k]).abs().sum() for k in keys) / sum(want[k].abs().sum() for k in keys)
    )


def _problem(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "gpt":
        model = TinyGPT(8, 16, d_model=32, heads=4, layers=2, mlp_ratio=2, causal=True)
        x = torch.randint(16, (1, 8))
    elif kind == "mlp":
        model = nn.Sequential(
            nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16)
        )
        x = torch.randn(1, 32, dtype=torch.float64)
    else:
        model = ResidualMLP(
            (32,), 16, width=32, hidden=64, blocks=2, act=nn.GELU, norm=True, bias=True
        )
        x = torch.randn(1, 32, dtype=torch.float64)
    return model.double().eval(), x, torch.randint(16, (1,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loss = nn.CrossEntropyLoss()
    for kind in ("gpt", "mlp", "resmlp"):
        errs: dict[str, list[float]] = {n: [] for n in NAMES}
        groups: dict[str, list[float]] = {g: [] for g in GROUPS}
        for seed in range(args.seeds):
            model, x, y = _problem(kind, seed)
            want = get_estimator("exact", method="structured")(model, loss, x, y)
            for n in NAMES:
                est = get_estimator(n)(model, loss, x, y)
                errs[n].append(_rel(est, want, list(want)))
                if n == "hesscale" and kind == "gpt":
                    for g in GROUPS:
                        groups[g].append(_rel(est, want, [k for k in want if g in k]))
        mean = {n: round(sum(v) / len(v), 3) for n, v in errs.items()}
        print(kind, mean)
        if kind == "gpt":
            print("  hesscale by group", {g: round(sum(v) / len(v), 3) for g, v in groups.items()})


if __name__ == "__main__":
    main()
