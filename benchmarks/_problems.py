"""The fixed problems the asv suite, the CI gate and the micro-benchmarks run on.

Each problem is built deterministically (weights from a fixed global seed inside
``torch.random.fork_rng``, data from a local ``torch.Generator``) in float32,
from plain ``torch.nn`` only, so that the same definitions run against any
version of hessbench.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["EXTRA_PROBLEMS", "GRAPH_PROBLEMS", "PROBLEMS", "Problem", "build_problem"]

Problem = tuple[nn.Module, nn.Module, Tensor, Tensor]


def _mlp784(batch: int) -> Problem:
    """784-128-64-10 tanh MLP, cross-entropy (MNIST-sized)."""
    model = nn.Sequential(
        nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def _cnn8(batch: int) -> Problem:
    """Two 3x3 convolutions, tanh and max pooling on 1x8x8 images, cross-entropy."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def cnn3x16_model() -> nn.Sequential:
    """Conv2d(3,16,3) ReLU MaxPool2d(2) Conv2d(16,32,3) Tanh Flatten Linear(800,10), for 3x16x16.

    The CNN of the performance issue; initialized from the global RNG.
    """
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(800, 10),
    )


def _cnn3x16(batch: int) -> Problem:
    """:func:`cnn3x16_model` on 3x16x16 inputs, cross-entropy."""
    model = cnn3x16_model()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def _costnet(batch: int, layers: int = 2) -> Problem:
    """The HesScale paper's cost net: Linear(64,512), L x [Linear(512,512), Tanh], Linear(512,100), MSE."""
    mods: list[nn.Module] = [nn.Linear(64, 512, bias=False)]
    for _ in range(layers):
        mods += [nn.Linear(512, 512, bias=False), nn.Tanh()]
    mods.append(nn.Linear(512, 100, bias=False))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 64, generator=gen)
    y = torch.randn(batch, 100, generator=gen)
    return nn.Sequential(*mods), nn.MSELoss(), x, y


class _ResMLP(nn.Module):
    """Linear in, pre-LayerNorm residual blocks (LayerNorm, Linear, GELU, Linear), LayerNorm, Linear."""

    def __init__(self, inputs: int = 64, width: int = 128, hidden: int = 256, blocks: int = 2):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
            )
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(self.norm(x))


class _BasicBlock(nn.Module):
    """ResNet's basic block with eval-mode BatchNorm and a 1x1 strided shortcut where needed."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


def _resnet() -> nn.Module:
    """A 3x3 stem, two basic blocks (8 and 16 channels), global average pooling, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _BasicBlock(8, 8, 1),
        _BasicBlock(8, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class _TinyGPT(nn.Module):
    """Embedding and learned positions, pre-norm ``nn.TransformerEncoderLayer`` blocks
    (GELU, causal mask), LayerNorm and a linear head on the last position."""

    def __init__(self, vocab: int = 16, length: int = 8, d: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, 2 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False
        )

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h, src_mask=self.mask)
        return self.head(self.norm(h[:, -1]))


def _graph(name: str, batch: int) -> Problem:
    """A model that is not an ``nn.Sequential`` of the layer table: the graph engine's."""
    gen = torch.Generator().manual_seed(5)
    if name == "resmlp":
        x = torch.randn(batch, 64, generator=gen)
        return _ResMLP(), nn.CrossEntropyLoss(), x, torch.randint(0, 10, (batch,), generator=gen)
    if name == "resnet":
        x = torch.randn(batch, 3, 16, 16, generator=gen)
        return _resnet(), nn.CrossEntropyLoss(), x, torch.randint(0, 10, (batch,), generator=gen)
    x = torch.randint(0, 16, (batch, 8), generator=gen)
    return _TinyGPT(), nn.CrossEntropyLoss(), x, torch.randint(0, 16, (batch,), generator=gen)


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "mlp784_b1": lambda: _mlp784(1),
    "mlp784_b32": lambda: _mlp784(32),
    "cnn8_b8": lambda: _cnn8(8),
    "costnet_b1": lambda: _costnet(1),
    "cnn3x16_b1": lambda: _cnn3x16(1),
}

EXTRA_PROBLEMS: dict[str, Callable[[], Problem]] = {
    "cnn8_b32": lambda: _cnn8(32),
}
"""Problems benchmarked for a few estimators only (``bench_estimators.ExactBatch``)."""

GRAPH_PROBLEMS: dict[str, Callable[[], Problem]] = {
    "resmlp_b1": lambda: _graph("resmlp", 1),
    "resnet_b1": lambda: _graph("resnet", 1),
    "gpt_b1": lambda: _graph("gpt", 1),
}
"""Residual and transformer models (the graph engine), for the HesScale family
(``bench_estimators.GraphEstimators``): a residual MLP with LayerNorm and GELU,
a ResNet with eval-mode BatchNorm, a two-layer causal GPT of standard modules."""


GRAPH_BATCH_PROBLEMS: dict[str, Callable[[], Problem]] = {
    "gpt_b32": lambda: _graph("gpt", 32),
}
"""The GPT at batch 32, where the diagonal pass below ``h[:, -1]`` runs on the last
position only (``bench_estimators.GraphBatch``: time and memory, no accuracy: the
float64 ground truth takes tens of seconds there)."""


def build_problem(name: str) -> Problem:
    """``(model, loss_fn, inputs, targets)`` of the problem ``name``, model in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        problems = {**PROBLEMS, **EXTRA_PROBLEMS, **GRAPH_PROBLEMS, **GRAPH_BATCH_PROBLEMS}
        model, loss_fn, x, y = problems[name]()
    return model.eval(), loss_fn, x, y
