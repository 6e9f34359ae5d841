"""Architectures built from standard torch modules: a residual MLP, a small ResNet, a tiny GPT.

Plain ``nn.Module`` classes whose ``forward`` is written as users write theirs
(``x + f(x)``, ``torch.relu``, ``torch.flatten``), so they exercise the graph
capture of the layer-by-layer estimators rather than a container of ours.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResMLPBlock", "ResNet", "ResidualMLP", "TinyGPT"]


class ResMLPBlock(nn.Module):
    """``x + W2 act(W1 norm(x))``: a pre-norm residual block of width ``width``."""

    def __init__(self, width: int, hidden: int, act: type[nn.Module], norm: bool, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.act = act()
        self.fc2 = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """``Linear`` in, residual blocks, an optional final ``LayerNorm``, ``Linear`` out."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        output_dim: int,
        *,
        width: int,
        hidden: int,
        blocks: int,
        act: type[nn.Module],
        norm: bool,
        bias: bool,
    ):
        super().__init__()
        self.inp = nn.Linear(math.prod(input_shape), width, bias=bias)
        self.blocks = nn.ModuleList(
            ResMLPBlock(width, hidden, act, norm, bias) for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.out = nn.Linear(width, output_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (or regression outputs), one row per sample."""
        x = self.inp(torch.flatten(x, 1))
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions (with BatchNorm) and a skip connection.

    The skip is the identity, or a strided 1x1 convolution (with BatchNorm) when the
    block changes the number of channels or the resolution.
    """

    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module], bn: bool):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn1 = norm(cout)
        self.act1 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not bn), norm(cout))
        self.act2 = act()

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, stages of basic blocks, global average pooling, ``Linear``.

    Stage ``i`` has ``channels[i]`` channels and ``blocks`` basic blocks; every stage
    after the first halves the resolution in its first block.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        output_dim: int,
        *,
        channels: list[int],
        blocks: int,
        act: type[nn.Module],
        bn: bool,
    ):
        super().__init__()
        cin = input_shape[0]
        self.stem = nn.Conv2d(cin, channels[0], 3, 1, 1, bias=not bn)
        self.stem_bn = nn.BatchNorm2d(channels[0]) if bn else nn.Identity()
        self.stem_act = act()
        layers: list[nn.Module] = []
        c = channels[0]
        for i, cout in enumerate(channels):
            for j in range(blocks):
                layers.append(BasicBlock(c, cout, 2 if (i > 0 and j == 0) else 1, act, bn))
                c = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (or regression outputs), one row per sample."""
        x = self.stem_act(self.stem_bn(self.stem(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyGPT(nn.Module):
    """A small GPT-style model of standard torch modules, reading token sequences.

    ``nn.Embedding`` plus a learned positional parameter, ``layers`` pre-norm
    ``nn.TransformerEncoderLayer`` blocks (GELU, no dropout) with a causal mask
    (or none), a final ``LayerNorm`` and a linear head on the last position.
    """

    def __init__(
        self,
        length: int,
        vocab: int,
        *,
        d_model: int,
        heads: int,
        layers: int,
        mlp_ratio: int,
        causal: bool,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, d_model))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                heads,
                mlp_ratio * d_model,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        mask = nn.Transformer.generate_square_subsequent_mask(length) if causal else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits over the vocabulary at the last position, one row per sequence."""
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h, src_mask=self.mask)
        return self.head(self.norm(h[:, -1]))
