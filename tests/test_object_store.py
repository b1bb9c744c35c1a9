"""Shard sets on object storage (DESIGN section 8): phase one writes and phase two reads any fsspec
URL, against a real S3 endpoint on localhost (the `s3_bucket` fixture: moto's server).

Each set written to `s3://` must verify and equal a local run of the same command: the same rows
by `id`, and Parquet parts identical byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from wspo.precompute.cli import main as precompute_main
from wspo.precompute.config import PrecomputeArguments
from wspo.precompute.pipeline import run
from wspo.shards.cli import main as shards_main
from wspo.shards.storage import StoreError, shard_path
from wspo.shards.store import ShardError, ShardSet

ENV = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
SCHEDULER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP",
                  "JOB_COMPLETION_INDEX")
OPTIONS = dict(max_length=384, max_prompt_length=192, max_samples=30, rows_per_file=4, batch_tokens=1024)


def make_args(tiny_models, out, **overrides) -> PrecomputeArguments:
    return PrecomputeArguments(output_dir=str(out), weak_ref=str(tiny_models["weak_ref"]),
                               weak_aligned=str(tiny_models["weak_aligned"]), **{**OPTIONS, **overrides})


def command(tiny_models, out, *extra) -> list[str]:
    argv = [sys.executable, "-m", "wspo.precompute.cli", "--output_dir", str(out),
            "--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"])]
    for key, value in OPTIONS.items():
        argv += [f"--{key}", str(value)]
    return argv + list(extra)


def environment(**extra) -> dict:
    """The test's environment (with the S3 endpoint) without scheduler variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS} | {"TOKENIZERS_PARALLELISM": "false"}
    return env | {k: str(v) for k, v in extra.items()}


def part_bytes(root) -> dict[str, bytes]:
    shards = ShardSet.open(root).check()
    return {f["path"]: (shards.root / f["path"]).read_bytes() for f in shards.files}


def rows_by_id(root) -> dict[str, dict]:
    return {row["id"]: row for row in ShardSet.open(root).check().read_table().to_pylist()}


@pytest.fixture(scope="module")
def local_one(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_one")
    run(make_args(tiny_models, out))
    return out


def test_one_worker_on_s3_equals_a_local_run(tiny_models, s3_bucket, local_one, capsys):
    url = f"{s3_bucket}/one"
    run(make_args(tiny_models, url))
    assert part_bytes(url) == part_bytes(local_one) and len(part_bytes(url)) == 8
    assert rows_by_id(url) == rows_by_id(local_one)
    store = shard_path(url)
    names = sorted(p.name for p in store.glob("*"))
    assert names == ["README.md", "data", "manifest.json"]  # no lock, no work folder, no temporary file left
    assert shards_main(["verify", url]) == 0
    assert "OK (8 files" in capsys.readouterr().out
    # A rerun finds the set complete and leaves it as it is.
    before = {p.name: p.read_bytes() for p in store.glob("*.json")}
    run(make_args(tiny_models, url))
    assert {p.name: p.read_bytes() for p in store.glob("*.json")} == before
