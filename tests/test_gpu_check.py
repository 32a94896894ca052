"""benchmarks/gpu_check.sh, the one script that checks the GPU path, on the CPU (CI has no GPU).

Its CPU fallback runs every section on tiny sizes, so the script a GPU session relies on is
known to work before device time is spent on it; the figures themselves mean nothing here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SECTIONS = ["agreement_fashion_mnist", "bf16_training", "tag_device_vs_cpu", "tag_speed", "time_to_accuracy",
            "ray_gpu_actor"]


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--quick",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["section"] for s in report["sections"]] == SECTIONS
    assert all(s["ok"] is not False for s in report["sections"]), report["sections"]
    checks = {s["section"]: s for s in report["sections"]}
    assert checks["agreement_fashion_mnist"]["labels_differ"] == 0
    assert checks["tag_device_vs_cpu"]["bad_files"] == 3  # the broken files became rows on both devices
    assert report["environment"]["cpu"]  # figures are only comparable with the hardware named
    assert "| tag_speed | measured |" in (tmp_path / "gpu_check.md").read_text()


def test_a_failed_check_fails_the_script(tmp_path):
    """A GPU session must not read a broken check as a pass: the exit status says it."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    code = (
        "import sys; sys.argv = ['gpu_check', '--out', sys.argv[1], '--quick', '--device', 'cpu']\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import gpu_check\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('labels differ')\n"
        "for name in ('agreement_fashion_mnist', 'bf16_training', 'tag_device_vs_cpu', 'tag_speed',\n"
        "             'time_to_accuracy', 'ray_gpu_actor'):\n"
        "    setattr(gpu_check, name, broken)\n"
        "gpu_check.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["ok"] for s in report["sections"]] == [False] * len(SECTIONS)
    assert "labels differ" in report["sections"][0]["error"]
