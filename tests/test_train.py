"""Training on a tiny Fashion-MNIST-shaped dataset: outputs, card, reproducibility, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from catalog_tagger import runtime
from catalog_tagger import train as train_module
from catalog_tagger.checkpoint import load_model
from catalog_tagger.config import DEFAULT_WIDTHS, TrainConfig
from catalog_tagger.errors import OutputError, UsageError
from catalog_tagger.train import fit, lr_schedule


def _config(tmp_path, data, name="run", **kw):
    defaults = dict(out=tmp_path / name, data_dir=data, epochs=2, batch_size=64, val_size=200, seed=0,
                    widths=(8, 16), stem_width=8, device="cpu")
    return TrainConfig(**{**defaults, **kw})


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def bf16_probe(request, monkeypatch):
    """The bf16 capability probe answers as a CPU with (or without) AVX512-BF16/AMX would, so
    both training precisions run whatever CPU runs the tests (bf16 autocast is emulated where
    the CPU lacks it: slower, same code path)."""
    monkeypatch.setattr(runtime, "native_bf16", lambda device: request.param)
    return request.param


def test_cli_train_writes_weights_card_curves_and_checkpoint(tmp_path, tiny_data_dir, run_cli, bf16_probe):
    out = tmp_path / "cli"
    result = run_cli("-q", "train", "--out", out, "--data-dir", tiny_data_dir, "--epochs", "3", "--batch-size", "64",
                     "--val-size", "200", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "model.json", "training_curves.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    card = json.loads((out / "model.json").read_text())
    assert card["classes"][0] == "T-shirt/top"
    assert card["training"]["command"].startswith("catalog-tagger") and "--epochs 3" in card["training"]["command"]
    assert set(card["training"]["data_checksums_sha256"]) == {
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}
    # The default precision follows the probe: bf16 where native, float32 elsewhere.
    assert card["training"]["precision"] == ("bf16 mixed" if bf16_probe else "float32")
    # The tiny task is easy: 1.0 for seeds 0-5 in bf16 and 0-2 in float32 (where batch norm's running
    # averages gave 0.55-1.0 by CPU and seed). A broken loop stays near 0.1.
    assert card["metrics"]["test_accuracy"] > 0.9
    assert card["preprocessing"]["name"] == "fashion-mnist-conversion"
    assert len(card["training"]["history"]) == 3
    assert load_model(out).config.widths == DEFAULT_WIDTHS
    # The vector instruction set decides training speed on CPU; cards from two CPUs compare only with it.
    assert torch.backends.cpu.get_cpu_capability() in card["training"]["device"]


def test_same_seed_gives_identical_weights(tmp_path, tiny_data_dir):
    a = fit(_config(tmp_path, tiny_data_dir, "a"), progress=False)
    b = fit(_config(tmp_path, tiny_data_dir, "b"), progress=False)
    assert a["weights_sha256"] == b["weights_sha256"]


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, tiny_data_dir, monkeypatch):
    straight = fit(_config(tmp_path, tiny_data_dir, "straight", epochs=3), progress=False)

    real_save = train_module.save_training_state
    calls = []

    def crash_after_first_epoch(path, state):
        real_save(path, state)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as if killed right after the epoch-1 checkpoint

    monkeypatch.setattr(train_module, "save_training_state", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(tmp_path, tiny_data_dir, "resumed", epochs=3), progress=False)
    monkeypatch.setattr(train_module, "save_training_state", real_save)
    resumed = fit(_config(tmp_path, tiny_data_dir, "resumed", epochs=3, resume=True), progress=False)

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert [r["val_accuracy"] for r in resumed["training"]["history"]] == \
        [r["val_accuracy"] for r in straight["training"]["history"]]


def test_refuses_to_overwrite_a_run_without_resume_or_overwrite(tmp_path, tiny_data_dir):
    fit(_config(tmp_path, tiny_data_dir, "once", epochs=1), progress=False)
    with pytest.raises(OutputError, match="--overwrite .*--resume"):
        fit(_config(tmp_path, tiny_data_dir, "once", epochs=1), progress=False)


def test_resume_with_other_options_is_refused(tmp_path, tiny_data_dir):
    fit(_config(tmp_path, tiny_data_dir, "r", epochs=1), progress=False)
    with pytest.raises(UsageError, match="different training options"):
        fit(_config(tmp_path, tiny_data_dir, "r", epochs=1, lr=0.5, resume=True), progress=False)


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_schedule(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(1 / 90)  # the last step still learns a little


def test_missing_data_exits_with_the_data_error_code(tmp_path, run_cli, monkeypatch):
    from catalog_tagger.data import fashion_mnist as fm

    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setattr(fm, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(fm, "MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    result = run_cli("train", "--out", tmp_path / "x", "--data-dir", tmp_path / "empty")
    assert result.exit_code == 3
    assert "Fashion-MNIST not found" in result.output and "Traceback" not in result.output


def test_without_native_bf16_the_default_trains_exactly_as_float32(tmp_path, tiny_data_dir, monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    default = fit(_config(tmp_path, tiny_data_dir, "default"), progress=False)
    full = fit(_config(tmp_path, tiny_data_dir, "full", mixed_precision=False), progress=False)
    assert default["training"]["precision"] == full["training"]["precision"] == "float32"
    assert default["weights_sha256"] == full["weights_sha256"]


def test_bf16_training_really_runs_in_bf16_and_learns(tmp_path, tiny_data_dir, monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)  # forced: runs on any CPU
    autocast_dtypes = []
    real_autocast = train_module.training_autocast

    def recording(device, dtype=None):
        autocast_dtypes.append(dtype)
        return real_autocast(device, dtype)

    monkeypatch.setattr(train_module, "training_autocast", recording)
    mixed = fit(_config(tmp_path, tiny_data_dir, "mixed", epochs=3), progress=False)
    assert set(autocast_dtypes) == {torch.bfloat16}
    autocast_dtypes.clear()
    full = fit(_config(tmp_path, tiny_data_dir, "full", epochs=3, mixed_precision=False), progress=False)
    assert set(autocast_dtypes) == {torch.float32}
    assert (mixed["training"]["precision"], full["training"]["precision"]) == ("bf16 mixed", "float32")
    assert mixed["weights_sha256"] != full["weights_sha256"]
    # Both learn: the loss falls and accuracy leaves chance (0.1) behind; these tiny widths get
    # 0.3-0.4 in 3 epochs either way (the CLI test above checks the default network reaches > 0.9).
    for card in (mixed, full):
        history = card["training"]["history"]
        assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
        assert card["metrics"]["val_accuracy"] > 0.2


def test_a_validation_split_as_large_as_the_training_set_is_a_usage_error(tmp_path, tiny_data_dir, run_cli):
    result = run_cli("-q", "train", "--data-dir", tiny_data_dir, "--out", tmp_path / "m", "--val-size", "1200")
    assert result.exit_code == 2 and "--val-size must be between 1 and 1199" in result.output


def _one_epoch(labels: torch.Tensor, smoothing: float) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    from catalog_tagger.train import StepSettings, TrainState, train_one_epoch

    torch.manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       torch.Generator().manual_seed(0))
    result = train_one_epoch(state, images, labels, StepSettings(32, torch.device("cpu"), smoothing, worn_prob=0.5))
    return model.state_dict(), result


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_train_like_their_hard_labels_when_one_hot(smoothing: float) -> None:
    """Self-training hands train_one_epoch class probabilities: one-hot ones must take the very
    steps the class indices take (same augmentation draws, same loss, same accuracy)."""
    hard = torch.arange(96) % 10
    weights_hard, result_hard = _one_epoch(hard, smoothing)
    weights_soft, result_soft = _one_epoch(torch.nn.functional.one_hot(hard, 10).float(), smoothing)
    assert result_soft == pytest.approx(result_hard, rel=1e-5)
    for name, value in weights_hard.items():
        torch.testing.assert_close(weights_soft[name], value)
    # And a soft target is not read as its argmax: the weights move differently.
    weights_half, _ = _one_epoch(0.5 * torch.nn.functional.one_hot(hard, 10).float() + 0.05, smoothing)
    assert not torch.allclose(weights_half["1.weight"], weights_hard["1.weight"])
