"""The wheel built from the repository installs into a clean venv and its commands run."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_into_clean_venv(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("wspo-*.whl")
    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies come from the test environment's site-packages through a path entry; .pth
    # files there (our editable install's finder) are not processed, so wspo itself is only
    # importable from the wheel.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)

    probe = (
        "import importlib.util, wspo, wspo.precompute, wspo.shards, wspo.train, wspo.configs\n"
        "from wspo.shards.tokenization import fallback_chat_template\n"
        "from wspo.embedded.sample import SAMPLE_DIR\n"
        "assert importlib.util.find_spec('precompute') is None and importlib.util.find_spec('train') is None\n"
        "assert 'Assistant' in fallback_chat_template()\n"
        "assert (SAMPLE_DIR / 'train_prefs.jsonl').exists()\n"
        "print(wspo.__file__)\n"
    )
    result = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip().startswith(str(env_dir))
    for tool in ("wspo-precompute", "wspo-shards"):
        help_text = subprocess.run([env_dir / "bin" / tool, "--help"], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
        assert "usage" in help_text
    assert "--weak_aligned" in subprocess.run([env_dir / "bin" / "wspo-precompute", "--help"], capture_output=True, text=True).stdout
