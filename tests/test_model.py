import pytest
import torch

from catalog_tagger.model import FASHION_MNIST_CLASSES, ModelConfig, build_model


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(classes=("shirt", "shoe", "bag"), input_size=64, channels=3, widths=(16, 32, 64),
                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        ModelConfig(input_size=32, widths=(8, 16)),
    ],
)
def test_any_class_list_input_size_and_channels_gives_one_logit_per_class(config):
    model = build_model(config).eval()
    x = torch.rand(4, config.channels, config.input_size, config.input_size)
    assert model(x).shape == (4, len(config.classes))


def test_config_round_trips_through_a_plain_dict():
    config = ModelConfig(classes=("a", "b"), widths=(4, 8, 16))
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ("only",)}, "at least two"),
        ({"classes": ("a", "a")}, "unique"),
        ({"channels": 3}, "one value per input channel"),
        ({"input_size": 4}, "too small"),
    ],
)
def test_impossible_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "depth": 50})


def test_default_classes_are_fashion_mnist_in_label_order():
    assert ModelConfig().classes == FASHION_MNIST_CLASSES
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
