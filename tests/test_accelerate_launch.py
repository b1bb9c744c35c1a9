"""`accelerate launch` on CPU: `--cpu` runs accelerate's simple launcher (ONE process, silently);
`--multi_gpu --num_processes 2` with `--use_cpu true` for the trainer starts two gloo processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_distributed import REPO, free_port
from test_train_helpers import train_argv, train_setup  # noqa: F401  (fixture)


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(train_setup, tmp_path):  # noqa: F811
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    argv = [str(a) for a in train_argv(train_setup, tmp_path / "two", max_steps=2, per_device_train_batch_size=2)]
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "wspo.train.cli"]
    done = subprocess.run([*launch, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "two/wspo_run.json").read_text())
    assert record["parallel"]["world_size"] == 2
    assert done.stdout.count("trained on ") == 1  # one summary, from the first process
