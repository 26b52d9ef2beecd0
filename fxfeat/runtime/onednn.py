"""The layers the oneDNN inference pass (:mod:`fxfeat.passes.fuse_onednn`) puts in an extractor: convolutions and
linear layers that pack their weight once per input shape for oneDNN and apply a post-op (an activation, a
residual sum) while the output is in cache; the plain ops wherever oneDNN does not apply.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from fxfeat.runtime.in_place import add_in_place

__all__ = ["OneDNNConv2d", "OneDNNConv2dAdd", "OneDNNLinear", "onednn_available"]

# oneDNN post-op name -> the same activation in PyTorch, given the post-op's scalars and algorithm.
_ACTIVATIONS = {
    "relu": lambda x, scalars, algorithm: F.relu(x),
    "hardtanh": lambda x, scalars, algorithm: F.hardtanh(x, scalars[0], scalars[1]),
    "leaky_relu": lambda x, scalars, algorithm: F.leaky_relu(x, scalars[0]),
    "swish": lambda x, scalars, algorithm: F.silu(x),
    "gelu": lambda x, scalars, algorithm: F.gelu(x, approximate=algorithm),
    "hardswish": lambda x, scalars, algorithm: F.hardswish(x),
    "hardsigmoid": lambda x, scalars, algorithm: F.hardsigmoid(x),
    "sigmoid": lambda x, scalars, algorithm: torch.sigmoid(x),
    "tanh": lambda x, scalars, algorithm: torch.tanh(x),
    "none": lambda x, scalars, algorithm: x,
}


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN operators the pass calls."""
    return torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, name) for name in ("_convolution_pointwise", "_linear_pointwise",
                                                     "_reorder_linear_weight"))


class _PackedLayer(nn.Module):
    """A layer + activation run by oneDNN with its weight packed per input shape (see the subclasses).

    The packings (one per input shape, at most ``CACHE_SIZE``) are a cache: not in the state dict, not pickled
    or copied, made again when needed. A call doing fewer than ``min_macs`` multiply-adds runs the plain ops:
    oneDNN's operators cost some 25-50 us per call more than PyTorch's, which a small layer does not repay (see
    the subclasses).
    """

    CACHE_SIZE = 4
    MIN_MACS = 2**20

    def __init__(self, layer: nn.Module, activation: tuple[str, list[float], str]):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.activation, self.scalars, self.algorithm = activation
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}

    def _pack(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= self.CACHE_SIZE:
                self._packed.pop(next(iter(self._packed)))
            packed = self._packed[key] = self._pack(key)
        return packed

    @property
    def min_macs(self) -> int:
        return self.MIN_MACS

    def _on_onednn(self, x: torch.Tensor, macs: int) -> bool:
        return macs >= self.min_macs and x.dtype is torch.float32 and not torch.is_grad_enabled() \
            and x.device.type == "cpu" and self.weight.dtype is torch.float32

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "none":
            return y
        return _ACTIVATIONS[self.activation](y, self.scalars, self.algorithm)

    def _apply(self, fn, recurse=True):
        self._packed = {}  # .to(), .half(): the packings describe the old weight
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**self.__dict__, "_packed": {}}

    def __deepcopy__(self, memo):
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return copied


class OneDNNConv2d(_PackedLayer):
    """``activation(F.conv2d(x, weight, bias, ...))``, by oneDNN on channels-last CPU maps (see the module
    docstring).

    Grouped and depthwise convolutions always run on oneDNN: PyTorch's channels-last kernels for them were slower
    at all but the largest sizes measured (a depthwise 3x3 of 96 channels on 7x7: 57 us, packed 48 us; groups of
    24 channels, 576 on 7x7: 207 us and 130 us; but groups of 24, 216 channels, batch 8 on 28x28: 2.8 ms and
    4.3 ms). A dense convolution doing fewer than ``MIN_MACS`` (2^23) multiply-adds per call runs ``F.conv2d``: a
    1x1 convolution 320 -> 1280 on a 2x2 map (1.6 M) takes 46 us in PyTorch, 71 us packed; on 7x7 (20 M), 213 us
    and 201 us; 2048 -> 512 on 7x7 (51 M), 908 us and 381 us (a 2-core Xeon, batch 1 unless said).
    """

    MIN_MACS = 2**23

    @property
    def min_macs(self) -> int:
        return 0 if self.groups > 1 else self.MIN_MACS

    def __init__(self, conv: nn.Conv2d, activation: tuple[str, list[float], str] = ("none", [], "")):
        super().__init__(conv, activation)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self._weight_numel = conv.weight.numel()

    def _pack(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(self.weight.to_mkldnn(), self.padding, self.stride,
                                                         self.dilation, self.groups, list(shape))

    def _runs_onednn(self, x: torch.Tensor) -> bool:
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return False
        shape = x.shape
        return self._on_onednn(x, shape[0] * (shape[2] // self.stride[0]) * (shape[3] // self.stride[1])
                               * self._weight_numel)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_onednn(x):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.activation, self.scalars, self.algorithm)
        return self._activate(self._conv(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, activation={self.activation}")


class OneDNNConv2dAdd(OneDNNConv2d):
    """``activation(F.conv2d(x, weight, bias, ...) + other)``, ``activation`` ReLU or none: a convolution, the
    residual sum after it and the ReLU after that in one oneDNN call (a *binary* post-op), written into ``other``
    when ``overwrite_other`` (the pass proved that nothing reads ``other`` afterwards) and the sum has its
    shape, dtype and layout. Measured on a 2-core Xeon, batch 1, channels-last (ResNet-50's ``conv3`` of
    ``layer1``, 64 -> 256 on 56x56): convolution, then ``add_`` and ``relu_``, 830 us; fused into a new tensor,
    560 us; fused into ``other``, 429 us (7x7, 512 -> 2048: 498, 465 and 441 us). Off oneDNN's path (see
    :class:`OneDNNConv2d`), the plain ops.
    """

    def __init__(self, conv: nn.Conv2d, activation: tuple[str, list[float], str] = ("none", [], ""),
                 overwrite_other: bool = False):
        if activation[0] not in ("relu", "none"):
            raise ValueError(f"oneDNN fuses only ReLU after a convolution's sum, not {activation[0]}")
        super().__init__(conv, activation)
        self.overwrite_other = overwrite_other

    def _output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        spatial = ((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for size, padding, dilation,
                   kernel, stride in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride))
        return (x.shape[0], self.out_channels, *spatial)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self._runs_onednn(x) and other.dtype == x.dtype and other.device == x.device \
                and other.is_contiguous(memory_format=torch.channels_last) and other.shape == self._output_shape(x):
            unary = "relu" if self.activation == "relu" else None
            arguments = (self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
                         "add", None, unary, [], None)
            if self.overwrite_other:
                return torch.ops.mkldnn._convolution_pointwise_.binary(other, x, *arguments)
            return torch.ops.mkldnn._convolution_pointwise.binary(x, other, *arguments)
        total = add_in_place(self._conv(x), other)  # into the convolution's new output when the shapes allow
        return total.relu_() if self.activation == "relu" else total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, overwrite_other={self.overwrite_other}"


class OneDNNLinear(_PackedLayer):
    """``activation(F.linear(x, weight, bias))``, by oneDNN on CPU tensors (see the module docstring); below
    ``MIN_MACS`` (2^20) multiply-adds per call, ``F.linear`` (oneDNN costs some 6 us more per call)."""

    def __init__(self, linear: nn.Linear, activation: tuple[str, list[float], str] = ("none", [], "")):
        super().__init__(linear, activation)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _pack(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(self.weight, math.prod(shape[:-1]))  # rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and self._on_onednn(x, x.numel() // x.shape[-1] * self.weight.numel()):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(x), self.bias, self.activation,
                                                      self.scalars, self.algorithm)
        return self._activate(F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"
