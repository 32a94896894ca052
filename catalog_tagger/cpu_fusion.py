"""CPU inference with each convolution and the GELU after it run as one oneDNN call.

At 28x28 the network's convolutions are small, and the passes over their outputs cost
almost as much as computing them: a separate GELU reads and writes every activation once
more. oneDNN (PyTorch's CPU convolution library) can apply the GELU while the convolution's
output is still in cache (a "post-op"); that is what ``torch.compile`` fuses on CPU, without
its 20 s of compilation per process or a C++ compiler on every machine that tags. Measured
on the network with flip TTA: 1.04-1.06x on an idle core, 1.2-1.4x while the other core is
busy (less memory traffic), 1.05x on a whole `tag` run of thumbnails; labels identical,
logits within 5e-6 (docs/performance.md).

The fused op is PyTorch's own (``torch.ops.mkldnn._convolution_pointwise``, the kernel that
``torch.compile`` calls), but it is not a public API: a build or version without it, or one
whose result differs from the plain layers, keeps the plain layers (``fuse_conv_gelu`` checks
the fused stack against them before using it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# The fused stack must reproduce the plain layers to float32 rounding, or it is not used.
_TOLERANCE = 1e-4


class _Conv(nn.Module):
    """A convolution (its own kernel, stride, padding, dilation and groups) with an optional
    GELU as a oneDNN post-op."""

    def __init__(self, conv: nn.Conv2d, gelu: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.post_op = "gelu" if gelu else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            self.post_op, [], "none")


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    """The leaf layers of nested ``nn.Sequential`` containers, in order, without identities
    (where ``runtime.fold_batchnorm`` left its folded batch norms)."""
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from _layers(child)
        elif not isinstance(child, nn.Identity):
            yield child


def _fusable(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def fused_stack(features: nn.Sequential) -> nn.Sequential | None:
    """``features`` (batch norms folded) with every convolution followed by an exact GELU
    replaced by one fused call; None when a layer is of a kind this does not know."""
    layers = list(_layers(features))
    fused: list[nn.Module] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if _fusable(layer):
            assert isinstance(layer, nn.Conv2d)
            gelu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.GELU) and layers[i + 1].approximate == "none"
            fused.append(_Conv(layer, gelu))
            i += 2 if gelu else 1
        elif isinstance(layer, (nn.MaxPool2d, nn.GELU)):
            fused.append(layer)
            i += 1
        else:
            return None
    return nn.Sequential(*fused)


def fuse_conv_gelu(model: nn.Module) -> nn.Module:
    """``model`` (an eval-mode CPU copy with batch norms folded, as ``runtime.prepare_model``
    makes it) with its ``features`` stack fused, when oneDNN is there and the fused stack
    gives the plain stack's outputs; ``model`` unchanged otherwise."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not torch.backends.mkldnn.is_available():
        return model
    fused = fused_stack(features)
    if fused is None:
        return model
    first = next((m for m in features.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return model
    # A few random inputs through both: the check that this build's fused op is the plain
    # layers' maths (it costs a few milliseconds once per process).
    size = getattr(getattr(model, "config", None), "input_size", 28)
    probe = torch.rand(4, first.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    probe = probe.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            same = bool(torch.allclose(fused(probe), features(probe), atol=_TOLERANCE, rtol=_TOLERANCE))
    except (RuntimeError, AttributeError, NotImplementedError):
        return model
    if same:
        model.features = fused
    return model


__all__ = ["fuse_conv_gelu", "fused_stack"]
