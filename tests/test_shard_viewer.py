"""`wspo-shards show --html`: the page loads in headless Chromium and shows the expected rows,
ordered by reward sum, each token coloured with its reward and log-probs on hover."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from wspo.precompute.config import PrecomputeArguments
from wspo.precompute.pipeline import run
from wspo.shards.cli import main as shards_main
from wspo.shards.store import ShardSet


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed here (CI installs it); install it with: apt-get install -y chromium")
    return found


@pytest.fixture(scope="module")
def shard_dir(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer")
    run(PrecomputeArguments(output_dir=str(out), weak_ref=str(tiny_models["weak_ref"]), weak_aligned=str(tiny_models["weak_aligned"]),
                            max_samples=30, max_length=384, max_prompt_length=256, rows_per_file=8))
    return out


def test_page_loads_in_chromium_with_the_expected_rows(shard_dir, tmp_path, capsys):
    page = tmp_path / "rewards.html"
    assert shards_main(["show", str(shard_dir), "--html", str(page), "-n", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    result = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    ids = re.findall(r'<div class="row" data-id="([0-9a-f]+)"', dom)
    assert len(ids) == 10 and len(set(ids)) == 10  # 5 highest, 5 lowest, none twice
    shards = ShardSet.open(shard_dir).check()
    table = shards.read_table(columns=["id", "reward_sum", "n_tokens"])
    by_sum = dict(zip(table["id"].to_pylist(), table["reward_sum"].to_pylist()))
    order = sorted(by_sum, key=lambda i: -by_sum[i])
    assert ids[:5] == order[:5] and ids[5:] == order[::-1][:5]
    # Every token of a shown row is one coloured span with its numbers on hover.
    n_tokens = dict(zip(table["id"].to_pylist(), table["n_tokens"].to_pylist()))
    first = dom.split(f'data-id="{ids[0]}"')[1].split('<div class="row"')[0]
    assert first.count('class="t"') == n_tokens[ids[0]]
    assert "reward " in first and "logp_weak_ref " in first and "logp_weak_aligned " in first
    assert '<svg class="histogram"' in dom and dom.count("<rect") == 60


def test_screenshot_renders(shard_dir, tmp_path):
    page = tmp_path / "rewards.html"
    assert shards_main(["show", str(shard_dir), "--html", str(page), "-n", "3"]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = os.environ.get("WSPO_VIEWER_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
