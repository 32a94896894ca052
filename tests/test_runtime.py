"""Batched inference and the precision choices shared by training and tagging."""

import pytest
import torch

from catalog_tagger import runtime
from catalog_tagger.checkpoint import load_model
from catalog_tagger.model import ModelConfig, build_model
from catalog_tagger.runtime import (
    CPU_CHUNK,
    fold_batchnorm,
    native_bf16,
    precision_name,
    predict_logits,
    prepare_model,
    training_autocast,
    training_dtype,
)

CPU = torch.device("cpu")


def _raw_model(flip_tta: bool = True, negative_scales: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8, 16), stem_width=8, flip_tta=flip_tta))
    # Non-trivial batch-norm statistics, so that a wrong chunk boundary or fold shows.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(-1.0 if negative_scales else 0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _model(flip_tta: bool = True) -> torch.nn.Module:
    return prepare_model(_raw_model(flip_tta), CPU)


def test_chunked_cpu_prediction_equals_one_pass_over_the_batch():
    model = _model()
    n = 2 * CPU_CHUNK + 37  # two full chunks and a ragged one
    batch = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        whole = model(batch.float().div(255).contiguous(memory_format=torch.channels_last))
    chunked = predict_logits(model, batch, CPU)
    assert chunked.shape == (n, 10) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    assert torch.equal(chunked.argmax(1), whole.argmax(1))


def test_prediction_of_one_image_matches_its_row_in_a_batch():
    model = _model()
    batch = torch.randint(0, 256, (CPU_CHUNK + 5, 1, 28, 28), dtype=torch.uint8)
    rows = predict_logits(model, batch, CPU)
    for i in (0, CPU_CHUNK - 1, CPU_CHUNK + 4):
        torch.testing.assert_close(predict_logits(model, batch[i : i + 1], CPU)[0], rows[i], atol=1e-4, rtol=1e-4)


def test_empty_batch_gives_no_rows():
    assert predict_logits(_model(), torch.zeros((0, 1, 28, 28), dtype=torch.uint8), CPU).shape[0] == 0


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)])
def test_the_bf16_probe_reads_the_cpu_flags_and_trusts_cuda(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert native_bf16(CPU) == (avx512_bf16 or amx)
    assert native_bf16(torch.device("cuda"))


@pytest.mark.parametrize("native", [True, False])
def test_default_training_precision_follows_the_probe_not_the_machine(monkeypatch, native):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    expected = torch.bfloat16 if native else torch.float32
    assert training_dtype(CPU, mixed_precision=True) == expected
    assert training_dtype(CPU, mixed_precision=False) == torch.float32
    assert precision_name(expected) == ("bf16 mixed" if native else "float32")
    with training_autocast(CPU):  # no dtype: the hardware's choice
        assert _model(flip_tta=False).train()(torch.rand(4, 1, 28, 28)).dtype == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_either_training_precision_runs_on_any_cpu_and_inference_stays_float32(dtype):
    # bf16 autocast works on CPUs without native bf16 (emulated), so both paths run everywhere.
    model = _model(flip_tta=False).train()
    x = torch.rand(4, 1, 28, 28)
    with training_autocast(CPU, dtype):
        assert model(x).dtype == dtype
    assert predict_logits(model.eval(), torch.zeros((2, 1, 28, 28), dtype=torch.uint8), CPU).dtype == torch.float32


def _norms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("negative_scales", [False, True])
def test_folding_batchnorm_keeps_the_outputs_and_leaves_the_original_alone(negative_scales):
    raw = _raw_model(negative_scales=negative_scales)
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    folded = fold_batchnorm(raw)
    x = torch.rand(64, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), raw(x), atol=1e-5, rtol=1e-5)
    # Norms right after a conv always fold; the ones behind a max pool (one per block)
    # only when all their scales are positive, which these random negative ones are not.
    assert _norms(raw) == 5
    assert _norms(folded) == (2 if negative_scales else 0)
    assert all(torch.equal(v, before[k]) for k, v in raw.state_dict().items())


def test_the_bundled_model_folds_completely_and_keeps_its_outputs():
    model = load_model(None).model.eval()
    prepared = prepare_model(model, CPU)
    assert _norms(prepared) == 0 and _norms(model) > 0
    batch = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        expected = model(batch.float().div(255))
    torch.testing.assert_close(predict_logits(prepared, batch, CPU), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_openmp_threads_sleep_unless_the_user_chose(given, expected):
    """Spinning OpenMP threads steal the cores the decoders and other jobs need (5x slower
    inference on a busy machine); the policy must be in place before torch loads."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    # What the command line imports first (it loads torch later, inside the commands).
    code = "import catalog_tagger.cli, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [expected, "False"]
