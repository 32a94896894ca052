"""`train` under torchrun with DistributedDataParallel: 2 CPU processes, gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catalog_tagger import train as train_module
from catalog_tagger.checkpoint import load_model
from catalog_tagger.config import TrainConfig
from catalog_tagger.distributed import DistInfo
from catalog_tagger.runtime import to_unit
from catalog_tagger.train import StepSettings, TrainState, fit, lr_schedule, train_one_epoch

ARGS = ("--epochs", "3", "--batch-size", "64", "--val-size", "200", "--device", "cpu")


def _indices_seen(rank: int, world_size: int, monkeypatch: pytest.MonkeyPatch, n: int = 200,
                  batch_size: int = 32) -> list[list[int]]:
    """The image indices one rank trains on in one epoch, batch by batch."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # each image carries its index
    batches: list[list[int]] = []

    def recording(batch, device):
        batches.append(batch[:, 0, 0, 0].tolist())
        return to_unit(batch, device)

    monkeypatch.setattr(train_module, "to_unit", recording)
    monkeypatch.setattr(train_module, "sum_across", lambda values, info, device: values)  # no process group
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       torch.Generator().manual_seed(0), torch.Generator().manual_seed(1000 * (rank + 1)))
    settings = StepSettings(batch_size, torch.device("cpu"), dist_info=DistInfo(rank, world_size))
    train_one_epoch(state, images, torch.arange(n) % 10, settings)
    return batches


def test_each_rank_trains_on_its_own_half_of_every_global_batch(monkeypatch):
    single = _indices_seen(0, 1, monkeypatch)
    rank0, rank1 = (_indices_seen(rank, 2, monkeypatch) for rank in (0, 1))
    # As many steps as one process takes, each on half the global batch of 32.
    assert len(rank0) == len(rank1) == len(single) == 200 // 32
    assert all(len(b) == 16 for b in rank0 + rank1)
    seen0, seen1 = {i for b in rank0 for i in b}, {i for b in rank1 for i in b}
    assert not seen0 & seen1  # different data
    assert len(seen0 | seen1) == 192  # together: one epoch, less the dropped ragged batch


def test_torchrun_two_processes_train_one_model_like_one_process(tmp_path, tiny_data_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "catalog_tagger", "-q", "train",
         "--out", str(out), "--data-dir", str(tiny_data_dir), *ARGS],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    # One writer: exactly the single-process file set, no per-rank copies or leftovers.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "model.json", "model.safetensors",
                                                     "training_curves.png"]
    assert proc.stderr.count("trained ") == 1  # only rank 0 reports
    assert load_model(out).sha256 == card["weights_sha256"]

    config = TrainConfig(out=tmp_path / "single", data_dir=tiny_data_dir, epochs=3, batch_size=64, val_size=200,
                         device="cpu", mixed_precision=card["training"]["config"]["mixed_precision"])
    single = fit(config, progress=False)
    # The same optimizer steps as one process (the LR schedule is counted in them): each rank
    # took half of every global batch, not a whole batch of its own.
    steps = 1000 // 64
    assert [r["lr"] for r in card["training"]["history"]] == [r["lr"] for r in single["training"]["history"]]
    assert [r["lr"] for r in card["training"]["history"]] == \
        pytest.approx([0.08 * lr_schedule(epoch * steps, 3 * steps, steps) for epoch in (1, 2, 3)])
    # Averaged gradients train the one model as well as one process does (per-rank batch
    # norm and augmentation make the weights differ, not the result).
    assert card["weights_sha256"] != single["weights_sha256"]
    assert card["metrics"]["test_accuracy"] >= single["metrics"]["test_accuracy"] - 0.05
    assert card["metrics"]["test_accuracy"] > 0.9
