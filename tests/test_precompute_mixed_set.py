"""The workers of one shard set must be one run: a worker whose set-mates were run with other
models or settings is refused before it scores anything, not only by readers afterwards."""

from __future__ import annotations

import hashlib
from pathlib import Path

from wspo.precompute.cli import main


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def worker(tiny_models, out: Path, index: int, weak_ref: str, weak_aligned: str, samples: int = 8) -> list[str]:
    return ["--dataset", "embedded", "--output_dir", str(out), "--max_samples", str(samples), "--slots", "chosen",
            "--max_length", "128", "--max_prompt_length", "96", "--backend", "hf", "--dtype", "float32",
            "--weak_ref", str(tiny_models[weak_ref]), "--weak_aligned", str(tiny_models[weak_aligned]),
            "--num_workers", "2", "--worker_index", str(index)]


def test_a_worker_with_other_models_than_its_set_mates_is_refused_up_front(tiny_models, tmp_path, capsys):
    out = tmp_path / "set"
    assert main(worker(tiny_models, out, 0, "weak_ref", "weak_aligned")) == 0
    before = snapshot(out)
    # Worker 1 with the scorers swapped: same shapes, same tokenizer, other weights per scorer.
    assert main(worker(tiny_models, out, 1, "weak_aligned", "weak_ref")) == 1
    err = capsys.readouterr().err
    # (the tokenizer is read from the first scorer's folder, so its record differs too)
    assert f"worker 0 of the shard set in {out} (manifest-00000-of-00002.json) was run with other " in err
    assert "scorer models than this worker: the workers of one set must share" in err
    assert snapshot(out) == before  # nothing scored, nothing written, the finished worker untouched
    # Another dataset size is another run too (the interrupted or finished mate names what differs).
    assert main(worker(tiny_models, out, 1, "weak_ref", "weak_aligned", samples=10)) == 1
    assert "was run with other dataset or options than this worker" in capsys.readouterr().err
    assert snapshot(out) == before
    # The matching worker completes the set.
    assert main(worker(tiny_models, out, 1, "weak_ref", "weak_aligned")) == 0
    assert (out / "manifest-00001-of-00002.json").exists()
