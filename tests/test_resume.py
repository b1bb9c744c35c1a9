"""A run killed with SIGKILL and started again ends with byte-identical shards (DESIGN section 4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from wspo.shards.store import ShardSet


def command(tiny_models, out) -> list[str]:
    return [
        sys.executable, "-m", "wspo.precompute.cli", "--output_dir", str(out),
        "--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]),
        "--max_length", "512", "--max_prompt_length", "256", "--max_samples", "60",
        "--rows_per_file", "6", "--batch_tokens", "1024", "--slots", "chosen,rejected",
    ]


def run_until(cmd, out, path_pattern: str, timeout: float = 120) -> list[str]:
    """Start the command and SIGKILL it as soon as a file matching `path_pattern` appears."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"run finished before {path_pattern} appeared: the kill point was missed")
            if list(out.glob(path_pattern)):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            time.sleep(0.005)
        pytest.fail("timed out")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_gives_identical_bytes(tiny_models, tmp_path):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    subprocess.run(command(tiny_models, clean), check=True, capture_output=True)

    cmd = command(tiny_models, resumed)
    # Kill while the first scorer runs, while the second runs, and while parts are assembled.
    left = run_until(cmd, resumed, "_work-00000/weak_ref-00003.parquet")
    assert "manifest.json" not in left and not any(p.startswith("data/part-") for p in left)
    left = run_until(cmd, resumed, "_work-00000/weak_aligned-00004.parquet")
    assert "_work-00000/weak_ref-00009.parquet" in left and "manifest.json" not in left
    left = run_until(cmd, resumed, "data/part-00000-00002.parquet")
    assert "manifest.json" not in left
    with pytest.raises(Exception, match="no manifest"):
        ShardSet.open(resumed)  # an interrupted set never looks complete
    subprocess.run(cmd, check=True, capture_output=True)

    a, b = ShardSet.open(clean).check(), ShardSet.open(resumed).check()
    assert [f["path"] for f in a.files] == [f["path"] for f in b.files] and len(a.files) == 20
    for record in a.files:
        assert (clean / record["path"]).read_bytes() == (resumed / record["path"]).read_bytes(), record["path"]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (clean, resumed))
    for volatile in ("created", "timing", "command", "checksum"):  # the command names its own output_dir
        ma.pop(volatile), mb.pop(volatile)
    assert ma == mb
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in clean.iterdir())
