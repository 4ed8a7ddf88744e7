"""The incremental engine equals the plain forward on every kind of op it has a rule for, and on the rest.

Each test builds copies of one input that differ in a box, runs them through the engine and
through the model as a plain batch, in float64, and asserts they agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convscope.hooks import frozen
from convscope.methods.occlusion.incremental import (
    Patch,
    Unsupported,
    incremental_forward,
    materialize,
    window,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _copies(x0: torch.Tensor, size: int, batch: int, seed: int = 0) -> Patch:
    """``batch`` random boxes of side ``size`` filled with noise, edges included."""
    gen = torch.Generator().manual_seed(seed)
    height, width = x0.shape[-2:]
    top = torch.randint(0, height - size + 1, (batch,), generator=gen)
    left = torch.randint(0, width - size + 1, (batch,), generator=gen)
    top[0], left[0] = 0, 0                                  # a corner
    top[1], left[1] = height - size, width - size           # the opposite corner
    values = torch.randn(batch, x0.shape[1], size, size, generator=gen, dtype=x0.dtype)
    return Patch(values, top, left)


def _agree(module: nn.Module, x0: torch.Tensor, edits: Patch):
    with frozen(module), torch.no_grad():
        out, mode = incremental_forward(module, x0, edits)
        ref = module(materialize(x0, edits, edits.batch))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    return mode.trace


def test_window_and_materialize_by_hand():
    base = torch.arange(16.0).reshape(1, 1, 4, 4)
    patch = Patch(torch.full((2, 1, 2, 2), -1.0), torch.tensor([0, 2]), torch.tensor([0, 1]))
    full = materialize(base, patch, 2)
    expected0 = base[0, 0].clone()
    expected0[0:2, 0:2] = -1
    expected1 = base[0, 0].clone()
    expected1[2:4, 1:3] = -1
    assert torch.equal(full[0, 0], expected0) and torch.equal(full[1, 0], expected1)
    # a window reaching one row above the map: that row is the fill value
    win = window(base, patch, torch.tensor([-1, 1]), torch.tensor([0, 0]), (3, 3), fill=9.0)
    assert torch.equal(win[0, 0], torch.tensor([[9.0, 9, 9], [-1, -1, 2], [-1, -1, 6]]))
    assert torch.equal(win[1, 0], torch.tensor([[4.0, 5, 6], [8, -1, -1], [12, -1, -1]]))


class _Zoo(nn.Module):
    """One of each op with a rule: strided/dilated/grouped/'same' convs, explicit zero pad, pools, cat, add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)                          # after an explicit asymmetric F.pad
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)                 # depthwise
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(8, 8, 4, padding="same")                   # even kernel: asymmetric "same"
        self.pw = nn.Conv2d(16, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = nn.functional.pad(x, (0, 1, 0, 1))                           # TF "same" style
        x = nn.functional.relu6(self.bn(self.stem(x)))
        y = torch.sigmoid(self.dw(x)) * x + self.dil(x)
        y = torch.cat([y, self.same(x)], dim=1)
        y = nn.functional.max_pool2d(self.pw(y), 3, stride=2, padding=1)
        y = nn.functional.avg_pool2d(y, 3, stride=1, padding=1)
        y = y + 0.5
        y.clamp_(min=-3.0)
        return self.head(y.mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_every_rule_is_exact():
    torch.manual_seed(0)
    model = _Zoo().double()
    x0 = torch.randn(1, 3, 41, 37, dtype=torch.float64)
    trace = _agree(model, x0, _copies(x0, 7, 6))
    assert trace.no_rule == {"mean": 1}, trace.no_rule       # only the global mean ran on full copies
    assert len(trace.convs) == 5 and trace.conv_macs()[0] < trace.conv_macs()[1]


def test_resnet_with_inplace_ops_is_exact():
    """torchvision ResNet: ReLU(inplace), `out += identity`, padded max-pool, strided 1x1 shortcut convs."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    x0 = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    _agree(model, x0, _copies(x0, 12, 5))


class _Awkward(nn.Module):
    """Ops without a rule: reflect padding, a squeeze-excite product with a pooled vector."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        x = torch.relu(self.a(x))
        scale = torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]
        return self.b(x * scale).flatten(1)


def test_ops_without_rule_run_on_full_copies_exactly():
    torch.manual_seed(0)
    model = _Awkward().double()
    x0 = torch.randn(1, 3, 20, 24, dtype=torch.float64)
    trace = _agree(model, x0, _copies(x0, 5, 4))
    assert "pad" in trace.no_rule                              # reflect padding has no incremental rule


class _ReadsBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 14 * 14, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))                 # size(0) is the base's 1, not the copies' B


def test_model_that_reads_the_batch_size_is_refused():
    model = _ReadsBatchSize().double()
    x0 = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with frozen(model), torch.no_grad(), pytest.raises(Unsupported):
        incremental_forward(model, x0, _copies(x0, 4, 3))
