"""`train` under torchrun with DistributedDataParallel: 2 CPU processes, gloo backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from catalog_tagger.checkpoint import load_model


def test_torchrun_two_processes_train_one_model_written_by_rank_0(tmp_path, tiny_data_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "catalog_tagger", "-q", "train",
         "--out", str(out), "--data-dir", str(tiny_data_dir), "--epochs", "3", "--batch-size", "64",
         "--val-size", "200", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    # One writer: exactly the single-process file set, no per-rank copies or leftovers.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "model.json", "model.safetensors",
                                                     "training_curves.png"]
    assert proc.stderr.count("trained ") == 1  # only rank 0 reports
    loaded = load_model(out)
    assert card["metrics"]["test_accuracy"] > 0.8  # the two ranks really trained one model together
    assert loaded.sha256 == card["weights_sha256"]
