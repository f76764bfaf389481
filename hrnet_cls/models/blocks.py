"""HRNet-C's blocks: residual units, HR modules with their fuse, transitions (docs/design.md §1.2-1.4, §1.7).

Names follow the authors' code and timm's ``hrnet.py``, so state-dict keys match theirs."""
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, List, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath as _DropPath
from timm.layers import register_notrace_function, register_notrace_module
from torch.utils.checkpoint import checkpoint

__all__ = ['BLOCKS', 'BasicBlock', 'Bottleneck', 'CheckpointSeq', 'Checkpointable', 'DropPath', 'HRModule',
           'HRStage', 'Transition', 'conv_bn', 'units']

BN_MOMENTUM = 0.1


@contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BN momentum 0 and num_batches_tracked restored: a checkpoint recompute leaves the buffers alone (§1.7)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def checkpoint_module(module: nn.Module, *args: Any) -> Any:
    """module(*args), keeping only the inputs; the forward is recomputed in backward. Under torch.compile
    the plain checkpoint: dynamo refuses a context_fn, and AOT autograd's recompute applies the BN
    buffer updates once anyway (tests/test_models.py)."""
    if torch.compiler.is_compiling():
        return checkpoint(module, *args, use_reentrant=False)
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _frozen_running_stats(module)))


def conv_bn(in_chs: int, out_chs: int, kernel: int, stride: int = 1, bias: bool = False,
            act: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=bias)
    bn = nn.BatchNorm2d(out_chs, momentum=BN_MOMENTUM)
    return nn.Sequential(conv, bn, nn.ReLU(inplace=True)) if act else nn.Sequential(conv, bn)


@register_notrace_module
class DropPath(_DropPath):
    """timm's DropPath as an FX leaf: it reads ``self.training`` when run, not when traced, and torchvision's
    dead-code pass cannot drop the in-place 1/keep_prob rescale inside timm's drop_path (docs/design.md §1.7)."""


class BasicBlock(nn.Module):
    """Two 3x3 convs; key names as timm's/the authors' BasicBlock."""
    expansion = 1

    def __init__(self, in_chs: int, width: int, drop_path: float = 0.0):
        super().__init__()
        out_chs = width * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(width, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs, momentum=BN_MOMENTUM)
        self.downsample = _projection(in_chs, out_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = F.relu_(self.bn1(self.conv1(x)))
        x = self.drop_path(self.bn2(self.conv2(x)))
        x += shortcut  # in place: BN's backward does not need its output; saves an allocation
        return F.relu_(x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4); key names as timm's/the authors' Bottleneck."""
    expansion = 4

    def __init__(self, in_chs: int, width: int, drop_path: float = 0.0):
        super().__init__()
        out_chs = width * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, momentum=BN_MOMENTUM)
        self.downsample = _projection(in_chs, out_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.relu_(self.bn2(self.conv2(x)))
        x = self.drop_path(self.bn3(self.conv3(x)))
        x += shortcut
        return F.relu_(x)


def _projection(in_chs: int, out_chs: int) -> nn.Module:
    if in_chs == out_chs:
        return nn.Identity()
    return conv_bn(in_chs, out_chs, 1, act=False)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


def units(block: type, in_chs: int, width: int, n: int, drop_path: List[float]) -> nn.Sequential:
    """n residual units; the first one projects in_chs to width * expansion."""
    chs = [in_chs] + [width * block.expansion] * (n - 1)
    return nn.Sequential(*[block(c, width, drop_path[i]) for i, c in enumerate(chs)])


@register_notrace_function  # an FX leaf (it branches on shapes) for timm's tracer and feature extraction...
@torch.fx.wrap  # ...and for plain torch.fx.symbolic_trace; torch.export and torch.compile trace through it
def _upsample_add(y: torch.Tensor, low: torch.Tensor, scale: int) -> torch.Tensor:
    """y + nearest_upsample(low, scale) without materialising the upsampled tensor (docs/design.md §1.7)."""
    b, c, h, w = y.shape
    lh, lw = low.shape[-2:]
    if lh * scale != h or lw * scale != w:
        # input side not a multiple of 32: the sizes do not divide
        return y + F.interpolate(low, size=(h, w), mode='nearest')
    # (B, C, lh, s, lw, s) + (B, C, lh, 1, lw, 1) broadcast
    y6 = y.reshape(b, c, lh, scale, lw, scale) + low.reshape(b, c, lh, 1, lw, 1)
    return y6.reshape(b, c, h, w)


class HRModule(nn.Module):
    """Parallel residual streams, then the fuse: out_i = ReLU(sum_j a(x_j -> i))."""

    def __init__(self, block: type, chs: List[int], widths: List[int], num_units: int, drop_path: List[float]):
        super().__init__()
        n = len(chs)
        self.branches = nn.ModuleList(
            [units(block, chs[i], widths[i], num_units, drop_path) for i in range(n)])
        out = [w * block.expansion for w in widths]
        self.fuse_layers = nn.ModuleList([
            nn.ModuleList([self._fuse_path(out, j, i) for j in range(n)]) for i in range(n)])

    @staticmethod
    def _fuse_path(chs: List[int], j: int, i: int) -> nn.Module:
        if j == i:
            return nn.Identity()
        if j > i:  # lower resolution: 1x1 conv + BN here, upsampling happens in the sum
            return conv_bn(chs[j], chs[i], 1, act=False)
        convs = [conv_bn(chs[j], chs[j], 3, 2) for _ in range(i - j - 1)]
        convs.append(conv_bn(chs[j], chs[i], 3, 2, act=False))
        return nn.Sequential(*convs)

    def _fuse(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for i, row in enumerate(self.fuse_layers):
            y: Optional[torch.Tensor] = None
            for j, path in enumerate(row):  # summed in j order, as the reference implementations do
                t = path(x[j])
                if y is None:
                    y = t
                elif j > i:
                    y = _upsample_add(y, t, 1 << (j - i))
                elif i > 0:  # y started as a fresh BN output of a downsampling path: add in place
                    y += t
                else:
                    y = y + t
            assert y is not None
            out.append(F.relu_(y))  # y is a fresh sum (>= 2 streams), never an input
        return out

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        y: List[torch.Tensor] = []
        for i, branch in enumerate(self.branches):
            y.append(branch(x[i]))
        return self._fuse(y)


class Checkpointable(nn.Sequential):
    """A Sequential whose children are recomputed in backward when grad_checkpointing is on; two subclasses
    only because TorchScript needs the forward's input type spelled out."""

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self.grad_checkpointing = False


class CheckpointSeq(Checkpointable):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self:
            x = checkpoint_module(m, x) if self.grad_checkpointing and not torch.jit.is_scripting() else m(x)
        return x


class HRStage(Checkpointable):
    """HR modules in sequence over the list of streams (B, C_i, H/2^i, W/2^i)."""

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        for m in self:
            x = checkpoint_module(m, x) if self.grad_checkpointing and not torch.jit.is_scripting() else m(x)
        return x


class Transition(nn.ModuleList):
    """Adapt widths of existing streams (3x3 conv) and spawn the new one from the last stream."""

    def __init__(self, prev: List[int], cur: List[int]):
        layers: List[nn.Module] = []
        for i, chs in enumerate(cur):
            if i < len(prev):
                layers.append(nn.Identity() if prev[i] == chs else conv_bn(prev[i], chs, 3))
            else:  # a new, lower-resolution stream: stride-2 convs from the lowest existing one
                n = i + 1 - len(prev)
                layers.append(nn.Sequential(
                    *[conv_bn(prev[-1], chs if k == n - 1 else prev[-1], 3, 2) for k in range(n)]))
        super().__init__(layers)

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for i, layer in enumerate(self):
            out.append(layer(x[i] if i < len(x) else x[-1]))
        return out
