"""Phase one reads the split lazily: block reads equal whole reads, malformed lines are counted or
named, one writer per worker (lock file), streaming reward statistics equal the exact ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wspo.embedded.sample import SAMPLE_DIR
from wspo.precompute.config import PrecomputeArguments
from wspo.precompute.data import InvalidRow, open_source
from wspo.shards.lock import LockError, OutputLock
from wspo.precompute.pipeline import PrecomputeError, run
from wspo.shards.store import RewardStatistics, ShardSet


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE_DIR / "train_prefs.jsonl").read_text(encoding="utf-8").splitlines()]


def make_args(tiny_models, out, dataset, **overrides) -> PrecomputeArguments:
    options = dict(output_dir=str(out), dataset=str(dataset), weak_ref=str(tiny_models["weak_ref"]),
                   weak_aligned=str(tiny_models["weak_aligned"]), max_length=384, max_prompt_length=192,
                   rows_per_file=4, batch_tokens=1024)
    options.update(overrides)
    return PrecomputeArguments(**options)


def test_blocks_of_every_source_equal_the_whole_split(tmp_path):
    rows = sample_rows()[:50]
    (tmp_path / "jsonl").mkdir()
    with open(tmp_path / "jsonl" / "train_prefs.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n" + ("\n" if i % 7 == 0 else ""))  # blank lines are not rows
    (tmp_path / "parquet").mkdir()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 23), tmp_path / "parquet" / "train_prefs-00000.parquet", row_group_size=5)
    pq.write_table(table.slice(23), tmp_path / "parquet" / "train_prefs-00001.parquet", row_group_size=6)
    for folder in ("jsonl", "parquet"):
        source = open_source(str(tmp_path / folder), "train_prefs")
        assert source.num_rows == 50
        assert list(source.rows()) == rows
        for start, stop in ((0, 1), (3, 17), (20, 31), (44, 50), (49, 60)):
            assert list(source.rows(start, stop)) == rows[start:stop], (folder, start, stop)
        assert open_source(str(tmp_path / folder), "train_prefs", max_samples=10).num_rows == 10
    # The fingerprint follows the bytes: same data, same fingerprint; one changed byte, another.
    again = open_source(str(tmp_path / "jsonl"), "train_prefs").fingerprint
    assert again == open_source(str(tmp_path / "jsonl"), "train_prefs").fingerprint
    path = tmp_path / "jsonl" / "train_prefs.jsonl"
    path.write_bytes(path.read_bytes().replace(b"helps!", b"helps.", 1))
    assert open_source(str(tmp_path / "jsonl"), "train_prefs").fingerprint != again


def bad_lines_file(tmp_path):
    rows = sample_rows()[:12]
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]
    lines[3] = lines[3][:40]  # cut in half: not JSON
    lines[7] = lines[7].replace("helps".encode(), b"\xff\xfe", 1)  # bytes that are not UTF-8
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_undecodable_and_invalid_json_lines_are_counted_or_named(tiny_models, tmp_path):
    path = bad_lines_file(tmp_path)
    source = open_source(str(path), "train")
    rows = list(source.rows())
    assert [type(r).__name__ for r in rows].count("InvalidRow") == 2 and isinstance(rows[3], InvalidRow)
    assert rows[7].reason == "invalid_text" and f"{path} line 8" in rows[7].detail

    manifest = run(make_args(tiny_models, tmp_path / "out", path))
    assert manifest["counts"]["skipped"] == {"invalid_json": 1, "invalid_text": 1}
    assert manifest["counts"]["rows_written"] == 10 == ShardSet.open(tmp_path / "out").check().num_rows

    with pytest.raises(PrecomputeError) as e:
        run(make_args(tiny_models, tmp_path / "strict", path, strict=True))
    assert f"row 3: invalid_json: {path} line 4: invalid JSON" in str(e.value)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_a_second_writer_of_the_same_worker_is_refused_naming_the_first(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out / ".lock-00000"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "2026-01-01T00:00:00+00:00"}))
        with pytest.raises(LockError) as e:
            run(make_args(tiny_models, out, SAMPLE_DIR, max_samples=8))
        assert f"held by another wspo-precompute (pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == [".lock-00000"]  # nothing written
        # The CLI says the same in one line.
        from wspo.precompute.cli import main

        assert main(["--output_dir", str(out), "--weak_ref", str(tiny_models["weak_ref"]),
                     "--weak_aligned", str(tiny_models["weak_aligned"]), "--max_samples", "8"]) == 1
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: the next run takes the lock over and finishes; no lock is left behind.
    manifest = run(make_args(tiny_models, out, SAMPLE_DIR, max_samples=8))
    assert manifest["counts"]["rows_written"] == 8 and not (out / ".lock-00000").exists()


def test_lock_owner_takes_over_its_own_launch(tmp_path):
    (tmp_path / ".lock-00002").write_text(json.dumps({"host": "another-node", "pid": 1, "owner": "launch-a"}))
    with pytest.raises(LockError):
        OutputLock(tmp_path, 2, owner="launch-b").__enter__()
    with OutputLock(tmp_path, 2, owner="launch-a"):
        assert json.loads((tmp_path / ".lock-00002").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock-00002").exists()


def test_streaming_reward_statistics_equal_exact_ones():
    rng = np.random.default_rng(0)
    tables, all_tokens, all_sums = [], [], []
    for _ in range(7):
        rewards = [rng.normal(0.1, 1.0, rng.integers(1, 300)).astype(np.float32) for _ in range(50)]
        sums = [float(r.astype(np.float64).sum()) for r in rewards]
        tables.append(pa.table({"reward": pa.array(rewards, pa.list_(pa.float32())), "reward_sum": sums}))
        all_tokens += rewards
        all_sums += sums
    tokens = np.concatenate(all_tokens).astype(np.float64)
    stats = RewardStatistics()
    for t in tables:
        stats.add(t)
    r = stats.result()
    assert r["tokens"] == tokens.size and not r["token_percentiles_sampled"]
    assert r["token_mean"] == pytest.approx(tokens.mean(), abs=1e-12)
    assert r["token_std"] == pytest.approx(tokens.std(), rel=1e-10)
    assert (r["token_min"], r["token_max"]) == (tokens.min(), tokens.max())
    assert r["token_p01_p50_p99"] == pytest.approx(np.quantile(tokens, [0.01, 0.5, 0.99]).tolist(), abs=1e-6)
    assert r["sum_std"] == pytest.approx(np.std(all_sums), rel=1e-10)
    assert r["positive_sum_fraction"] == np.mean(np.array(all_sums) > 0)

    # Past the sample size, percentiles come from every 2^k-th token, still close; memory stays bounded.
    small = RewardStatistics()
    small.SAMPLE = 16384
    for t in tables:
        small.add(t)
    s = small.result()
    assert s["token_percentiles_sampled"] and sum(a.size for a in small._sample) <= 16384 + 300 * 50
    assert s["token_mean"] == pytest.approx(tokens.mean(), abs=1e-12)
    assert s["token_p01_p50_p99"] == pytest.approx(np.quantile(tokens, [0.01, 0.5, 0.99]).tolist(), abs=0.15)
