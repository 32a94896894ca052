"""CPU inference with each convolution and its GELU fused into one oneDNN call."""

import pytest
import torch
from torch import nn

from catalog_tagger import cpu_fusion
from catalog_tagger.checkpoint import load_model
from catalog_tagger.cpu_fusion import fuse_conv_gelu, fused_stack
from catalog_tagger.model import ModelConfig, build_model
from catalog_tagger.runtime import fold_batchnorm, predict_features_and_logits, predict_logits, prepare_model

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _plain(model: nn.Module) -> nn.Module:
    """What prepare_model made before the fusion: folded, channels_last, eval."""
    return fold_batchnorm(model).to(memory_format=torch.channels_last)


def _random_model(widths: tuple[int, ...] = (8, 16), flip_tta: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=widths, stem_width=8, flip_tta=flip_tta))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@needs_onednn
def test_the_bundled_model_is_fused_and_gives_the_plain_logits_and_features():
    loaded = load_model(None)
    fused = prepare_model(loaded.model, CPU)
    assert any(isinstance(m, cpu_fusion._Conv) for m in fused.modules())
    # Every convolution followed by a GELU lost its separate GELU layer.
    assert sum(isinstance(m, nn.GELU) for m in fused.modules()) < sum(
        isinstance(m, nn.GELU) for m in loaded.model.modules())
    plain = _plain(loaded.model)
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(predict_logits(fused, images, CPU), predict_logits(plain, images, CPU),
                               atol=5e-5, rtol=1e-5)
    feats_fused, logits_fused = predict_features_and_logits(fused, images, CPU)
    feats_plain, logits_plain = predict_features_and_logits(plain, images, CPU)
    torch.testing.assert_close(feats_fused, feats_plain, atol=5e-5, rtol=1e-5)
    assert torch.equal(logits_fused.argmax(1), logits_plain.argmax(1))


@needs_onednn
@pytest.mark.parametrize("widths", [(8,), (8, 16, 24)])
def test_other_shapes_fuse_to_the_same_outputs(widths):
    model = _random_model(widths)
    fused = prepare_model(model, CPU)
    assert any(isinstance(m, cpu_fusion._Conv) for m in fused.modules())
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(predict_logits(fused, images, CPU), predict_logits(_plain(model), images, CPU),
                               atol=5e-5, rtol=1e-5)


def test_the_model_handed_in_is_left_as_it_was():
    model = _random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_model(model, CPU)
    assert all(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, cpu_fusion._Conv)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fused_op_that_computes_something_else_is_not_used(monkeypatch):
    """The check against the plain layers is what keeps a build whose fused op differs
    (or fails) from changing labels."""
    monkeypatch.setattr(cpu_fusion._Conv, "forward", lambda self, x: torch.zeros(
        x.shape[0], self.weight.shape[0], *x.shape[2:]))
    prepared = prepare_model(_random_model(), CPU)
    assert not any(isinstance(m, cpu_fusion._Conv) for m in prepared.modules())

    def fails(self, x):
        raise RuntimeError("mkldnn: unsupported")

    monkeypatch.setattr(cpu_fusion._Conv, "forward", fails)
    prepared = prepare_model(_random_model(), CPU)
    assert not any(isinstance(m, cpu_fusion._Conv) for m in prepared.modules())
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    assert predict_logits(prepared, images, CPU).shape == (8, 10)


def test_without_onednn_the_plain_layers_run(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    prepared = prepare_model(_random_model(), CPU)
    assert not any(isinstance(m, cpu_fusion._Conv) for m in prepared.modules())


def test_a_stack_with_a_layer_it_does_not_know_is_left_alone():
    stack = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.GELU())
    assert fused_stack(stack) is None
    approximate = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GELU(approximate="tanh"))
    fused = fused_stack(approximate)
    # A tanh GELU is not what oneDNN's post-op computes: it stays a layer of its own.
    assert fused is not None and isinstance(fused[1], nn.GELU)
    model = nn.Linear(3, 3)
    assert fuse_conv_gelu(model) is model
