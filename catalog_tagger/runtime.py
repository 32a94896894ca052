"""Device choice and batched inference shared by training, evaluation and tagging."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .cpu_fusion import fuse_conv_gelu
from .errors import UsageError

if TYPE_CHECKING:
    from .model import GarmentNet


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def default_workers() -> int:
    """One decoding process per core the scheduler gives us.

    Not capped: on CPU each worker also runs the model on its own batches, and with a GPU
    the decoders are what limits throughput, so every core is worth a worker.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """The number of decoding processes: ``workers`` as given (0: decode in this process),
    or one per available core when not given (``--workers`` left unset)."""
    return default_workers() if workers is None else workers


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Let torch use ``n`` threads inside the block, as many as before after it.

    The main process of a CPU tagging run only builds rows while its workers run the model:
    with torch's default of a thread per core, its few small tensor operations had every
    core's OpenMP thread spin for them, against the workers (0.45 s of 1.3 s of its CPU time
    on 6,000 thumbnails).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# On CPU the network runs fastest on batches whose activations stay in the cache: at
# 28x28, chunks of 128 images ran 1.2-1.9x faster than one pass over 512 (benchmarks/model_speed.py).
CPU_CHUNK = 128


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA, or a CPU with AVX512-BF16 or AMX).

    Elsewhere bf16 is emulated and slower than float32.
    """
    if device.type == "cuda":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def describe_device(device: torch.device) -> str:
    """The hardware in a few words, for model cards and benchmark headers.

    On CPU it names the vector instruction set torch uses (AVX2, AVX512, ...): it decides
    both whether bf16 training pays and how fast the convolutions run, so figures from
    two CPUs are comparable only with it.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = ", native bf16" if native_bf16(device) else ""
    return f"cpu ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}{bf16}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (never a nickname); the architecture
    where the system does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def training_dtype(device: torch.device, mixed_precision: bool = True) -> torch.dtype:
    """The precision training computes in: bf16 where mixed precision is asked for and
    ``device`` computes bf16 natively, float32 otherwise (emulated bf16 is slower than
    float32). The one place this is decided, so that the card records what really ran."""
    return torch.bfloat16 if mixed_precision and native_bf16(device) else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    """How a model card names the training precision."""
    return "bf16 mixed" if dtype == torch.bfloat16 else "float32"


def training_autocast(device: torch.device, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (default: what ``training_dtype`` picks for the hardware) for the
    forward pass of training; weights, gradients, the optimizer step and the loss stay float32.

    bf16 is 1.5x faster on an AVX512-BF16 CPU. Forcing ``torch.bfloat16`` runs that same code
    path on any CPU (emulated, slower), which is how the tests exercise it everywhere.
    Inference never uses it: labels must not depend on the device beyond float32 rounding.
    """
    dtype = training_dtype(device) if dtype is None else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """An inference copy of ``model``: batch norm folded into the convolutions, on the
    device in channels_last layout (faster convolutions on CPU and GPU), in eval mode.

    ``model`` itself is left as it was, so it can still be trained or saved.
    """
    if device.type == "cuda":
        # TF32 convolutions round inputs to 10 mantissa bits; labels on a GPU should match
        # the CPU's to float32 rounding, and this network is nowhere near compute-bound there.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    prepared = fold_batchnorm(model).to(device).to(memory_format=torch.channels_last)
    # On CPU each convolution and its GELU run as one oneDNN call (cpu_fusion.py; same labels).
    return fuse_conv_gelu(prepared) if device.type == "cpu" else prepared


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode where each batch norm that follows a convolution
    (directly, or through max pooling) is folded into that convolution's weights and bias.

    In eval mode batch norm is a per-channel ``x * scale + shift``, which the convolution
    can compute for free; this saves a pass over the activations per layer (3-5% of the
    network's time, benchmarks/model_speed.py). Max pooling commutes with the affine map only
    when every scale is positive, so a norm behind a pool is folded only then. The outputs
    equal the unfolded model's to float32 rounding.
    """
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i, bn in enumerate(seq):
            if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
                continue
            j = i - 1
            while j >= 0 and isinstance(seq[j], nn.MaxPool2d):
                j -= 1
            conv = seq[j] if j >= 0 else None
            if not isinstance(conv, nn.Conv2d) or conv.out_channels != bn.num_features:
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight
                if j < i - 1 and not bool((scale > 0).all()):
                    continue
                shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
                bias = conv.bias * scale + shift if conv.bias is not None else shift
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias)
            seq[i] = nn.Identity()
    return model


def to_unit(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1] on ``device``; the one place this happens.

    Copying uint8 and converting on the device moves a quarter of the bytes.
    """
    batch = batch.to(device, non_blocking=True)
    return batch.float().div_(255).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def predict_logits(model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits (float32, on CPU) for one uint8 batch (N, C, H, W), in float32 on every device."""
    chunk = CPU_CHUNK if device.type == "cpu" else len(batch)
    # split() yields at least one (possibly empty) part, so an empty batch gives (0, classes).
    parts = [model(to_unit(part, device)) for part in batch.split(max(1, chunk))]
    return torch.cat(parts).float().cpu()


@torch.inference_mode()
def predict_features_and_logits(model: nn.Module, batch: torch.Tensor, device: torch.device
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, D) and logits (N, classes), float32 on CPU, of a ``GarmentNet`` (or
    its ``prepare_model`` copy) for one uint8 batch, in one pass: the logits are the head
    applied to the features, equal to ``predict_logits``'s to float rounding."""
    net = cast("GarmentNet", model)
    chunk = CPU_CHUNK if device.type == "cpu" else len(batch)
    feats = torch.cat([net.pooled_features(to_unit(part, device)) for part in batch.split(max(1, chunk))])
    return feats.float().cpu(), net.head(feats).float().cpu()


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 arrays (N, H, W) or (N, C, H, W) as (N, C, H, W) tensors, batch by batch."""
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        yield chunk.unsqueeze(1) if chunk.ndim == 3 else chunk


def predict_logits_array(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 1024,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Raw logits (N, classes) for a uint8 image array."""
    out = []
    total = (len(images) + batch_size - 1) // batch_size
    for batch in tqdm(iter_batches(images, batch_size), total=total, desc=desc, disable=not progress, leave=False):
        out.append(predict_logits(model, batch, device).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
