"""In-place ops on views (GhostNet's ``x += shortcut`` on a slice of a ``cat``): lrp runs in-place ops out of
place, so it writes the result back into a copy of the tensor the view shows, and moves the views of a tensor
changed in place along. The same model written out of place must give the same output and the same heatmap;
where another view would keep the old values, explain stops with an error instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp


class Base(nn.Module):
    def __init__(self, channels: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(channels * 8 * 8, 4, bias=False)


class ReluIntoView(Base):
    def forward(self, x):
        y = self.conv(x) * 1.0
        F.relu(y[:, :3], inplace=True)
        return self.fc(y.flatten(1))


class MaskIntoView(Base):
    def forward(self, x):
        y = self.conv(x) * 1.0
        v = y[:, :3]
        v[v < 0] = 0.0
        return self.fc(y.flatten(1))


class ReluOutOfPlace(Base):
    def forward(self, x):
        y = self.conv(x) * 1.0
        return self.fc(torch.cat([F.relu(y[:, :3]), y[:, 3:]], 1).flatten(1))


class GhostShortcut(Base):  # timm's GhostBottleneck: out = cat(...)[:, :n]; out += shortcut
    def __init__(self):
        super().__init__(3)

    def forward(self, x):
        y = torch.cat([self.conv(x), x], 1)[:, :3]
        y += x
        return self.fc(y.flatten(1))


class GhostOutOfPlace(Base):
    def __init__(self):
        super().__init__(3)

    def forward(self, x):
        return self.fc((torch.cat([self.conv(x), x], 1)[:, :3] + x).flatten(1))


class SlicesChanged(Base):
    def forward(self, x):
        y = self.conv(x) * 1.0
        y[:, :3] += x
        y[:, :3] *= 2
        y[:, 3:].add_(x)
        return self.fc(y.flatten(1))


class SlicesOutOfPlace(Base):
    def forward(self, x):
        y = self.conv(x) * 1.0
        return self.fc(torch.cat([(y[:, :3] + x) * 2, y[:, 3:] + x], 1).flatten(1))


class ChunksChanged(Base):
    def forward(self, x):
        a, b = (self.conv(x) * 1.0).chunk(2, 1)
        a += x
        b.mul_(3)
        a += x
        return self.fc(torch.cat([a, b], 1).flatten(1))


class ChunksOutOfPlace(Base):
    def forward(self, x):
        a, b = (self.conv(x) * 1.0).chunk(2, 1)
        return self.fc(torch.cat([a + x + x, b * 3], 1).flatten(1))


class ViewReadAfterBaseChanged(Base):
    def forward(self, x):
        y = self.conv(x) * 1.0
        v = y[:, 3:]
        y.relu_()  # v sees this change
        return self.fc(torch.cat([y[:, :3], v], 1).flatten(1))


class ViewReadOutOfPlace(Base):
    def forward(self, x):
        y = F.relu(self.conv(x) * 1.0)
        return self.fc(torch.cat([y[:, :3], y[:, 3:]], 1).flatten(1))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("written, plain", [(ReluIntoView, ReluOutOfPlace), (MaskIntoView, ReluOutOfPlace),
                                            (GhostShortcut, GhostOutOfPlace), (SlicesChanged, SlicesOutOfPlace),
                                            (ChunksChanged, ChunksOutOfPlace),
                                            (ViewReadAfterBaseChanged, ViewReadOutOfPlace)])
@pytest.mark.parametrize("composite", ["lrp0", "epsilon-plus-flat"])
def test_in_place_ops_on_views_equal_the_model_written_out_of_place(written, plain, composite):
    model, ref = written().double().eval(), plain().double().eval()
    x = _x()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(expected, ref(x))
    ours = lrp.explain(model, x, target=0, composite=composite)
    torch.testing.assert_close(ours.output, expected)  # the forward lrp ran is the model's
    theirs = lrp.explain(ref, x, target=0, composite=composite)
    torch.testing.assert_close(ours.relevance, theirs.relevance, rtol=1e-10, atol=1e-12)
    if composite == "lrp0":  # bias-free: conserved
        torch.testing.assert_close(ours.conservation["input"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-9)


class OverlappingViewHeld(Base):
    def __init__(self):
        super().__init__(3)

    def forward(self, x):
        y = self.conv(x) * 1.0
        first, second = y[:, :3], y[:, 1:4]
        first += x  # second shares channels 1 and 2 with it
        return self.fc(second.flatten(1))


class WriteIntoConstant(Base):
    def __init__(self):
        super().__init__(3)

    def forward(self, x):
        y = torch.zeros(x.shape[0], 6, 8, 8, dtype=x.dtype)
        y[:, :3] += self.conv(x)[:, :3]
        return self.fc(y[:, :3].flatten(1))


@pytest.mark.parametrize("model, match", [(OverlappingViewHeld, "another view"), (WriteIntoConstant, "constant")])
def test_a_view_that_would_keep_old_values_is_an_error(model, match):
    with pytest.raises(lrp.UnsupportedOperationError, match=match):
        lrp.explain(model().double().eval(), _x(), target=0)


class ShapeChangedInPlace(Base):
    def __init__(self, how: str):
        super().__init__(3)
        self.how = how

    def forward(self, x):
        y = self.conv(x) * 1.0
        v = y[:, :3]
        if self.how == "t_":
            s = y[0, 0]
            row = s[:, 0]
            s.t_()  # only the shape changes: row keeps its values
            return self.fc(v.flatten(1)) + row.sum()
        y.unsqueeze_(0)
        return self.fc(v.flatten(1)) + y.sum()


@pytest.mark.parametrize("how", ["t_", "unsqueeze_"])
def test_an_op_that_only_changes_the_shape_in_place_leaves_the_views_alone(how):
    model = ShapeChangedInPlace(how).double().eval()
    x = _x()
    with torch.no_grad():
        expected = model(x)
    res = lrp.explain(model, x, target=0, composite="lrp0")
    torch.testing.assert_close(res.output, expected)
