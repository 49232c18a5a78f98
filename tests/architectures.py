"""Small test architectures that exercise what real models do in ``forward``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Sequential2d(nn.Sequential):
    def __init__(self, bias: bool = True):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32, bias=bias), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(32, 5, bias=bias),
        )


class Residual(nn.Module):
    """Functional add, one ReLU module used three times, torch.flatten, x.mean."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.relu(self.conv1(x))
        y = self.conv2(y)
        x = self.relu(x + y)
        x = x.mean(dim=(2, 3))
        return self.fc(torch.flatten(x, 1))


class Concatenating(nn.Module):
    """Two branches joined by torch.cat, then split again with chunk."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.b = nn.Conv2d(3, 4, 5, padding=2, bias=bias)
        self.mix = nn.Conv2d(8, 8, 1, bias=bias)
        self.fc = nn.Linear(8 * 8 * 8 // 2, 5, bias=bias)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        h = F.relu(self.mix(h))
        left, right = h.chunk(2, dim=1)
        h = left + right
        return self.fc(h.reshape(h.shape[0], -1))


class Hyperspectral(nn.Module):
    """3D convolution over (band, H, W), reshaped in forward to 2D, then a depthwise-separable conv."""

    def __init__(self, bias: bool = True, bands: int = 6):
        super().__init__()
        self.conv3d = nn.Conv3d(1, 4, (3, 3, 3), padding=(0, 1, 1), bias=bias)
        channels = 4 * (bands - 2)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=bias)
        self.pointwise = nn.Conv2d(channels, 8, 1, bias=bias)
        self.head = nn.Linear(8, 5, bias=bias)

    def forward(self, x):  # x: (N, 1, bands, H, W)
        h = F.relu(self.conv3d(x))
        n, c, d, hh, ww = h.shape
        h = h.view(n, c * d, hh, ww)
        h = F.relu(self.pointwise(F.relu(self.depthwise(h))))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.head(h)


class Conv1dNet(nn.Sequential):
    def __init__(self, bias: bool = True):
        super().__init__(
            nn.Conv1d(2, 6, 5, stride=2, padding=2, bias=bias), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(6, 6, 3, dilation=2, padding=2, bias=bias), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 5, bias=bias),
        )


class TabularMLP(nn.Module):
    """An MLP ending in a sigmoid (one probability per sample)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(10, 16, bias=bias)
        self.fc2 = nn.Linear(16, 8, bias=bias)
        self.out = nn.Linear(8, 1, bias=bias)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        return torch.sigmoid(self.out(h))


class SharedWeights(nn.Module):
    """One Linear applied twice (weight sharing), with data-dependent control flow in between."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.shared = nn.Linear(6, 6, bias=bias)
        self.head = nn.Linear(6, 3, bias=bias)

    def forward(self, x):
        h = F.relu(self.shared(x))
        if h.sum() > 0:  # a branch on a tensor value: symbolic tracing cannot follow it
            h = F.relu(self.shared(h))
        return self.head(h)


def _order_one(model: nn.Module) -> nn.Module:
    """He-initialise every layer so that activations (and logits) stay of order one."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def bias_free_models():
    """(name, model, input) for the conservation tests; logits of order one."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    models = [
        ("sequential", Sequential2d(bias=False), torch.randn(3, 3, 16, 16, generator=g)),
        ("residual", Residual(bias=False), torch.randn(3, 3, 8, 8, generator=g)),
        ("concatenating", Concatenating(bias=False), torch.randn(3, 3, 8, 8, generator=g)),
        ("hyperspectral", Hyperspectral(bias=False), torch.randn(3, 1, 6, 8, 8, generator=g)),
        ("conv1d", Conv1dNet(bias=False), torch.randn(3, 2, 32, generator=g)),
        ("mlp", TabularMLP(bias=False), torch.randn(3, 10, generator=g)),
        ("shared", SharedWeights(bias=False), torch.randn(3, 6, generator=g)),
    ]
    return [(name, _order_one(model), x) for name, model, x in models]


class LastToken(nn.Module):
    """A Hugging Face causal language model read at its last token: ``(batch, vocabulary)`` logits."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits[:, -1]
