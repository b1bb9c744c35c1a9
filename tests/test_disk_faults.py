"""A full disk, a used-up quota, a read-only file system or a file-size limit mid-write: every
command names it with the path and what to do, and leaves nothing that looks complete; a rerun
resumes. Truncated weights are named alike by every command that loads a model.

The fault is real: the file-size limit (RLIMIT_FSIZE) of this process, lowered around the one
call (Python ignores SIGXFSZ, so the write fails with EFBIG, as it would with ENOSPC on a full
disk); helper processes inherit it. The errno -> message table is checked for ENOSPC, EDQUOT and
EROFS as every library reports them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import resource
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_train_helpers import SHARD_MAX_LENGTH, SHARD_MAX_PROMPT_LENGTH, train_argv, train_setup  # noqa: F401

EFBIG_TEXT = "the file would exceed this process's file-size limit (ulimit -f) (EFBIG)"


@contextmanager
def file_size_limit(nbytes: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exc, code", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/part.parquet"), "ENOSPC"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "EDQUOT"),
    (OSError(errno.EROFS, "Read-only file system"), "EROFS"),
    (RuntimeError("PytorchStreamWriter failed: No space left on device"), "ENOSPC"),  # torch
    (Exception("Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded })"), "EDQUOT"),  # safetensors
    (OSError("[errno 30] Error writing bytes to file"), "EROFS"),  # pyarrow
])
def test_disk_errors_are_named_however_a_library_reports_them(exc, code):
    from wspo.disk import disk_message, error_text

    message = disk_message(exc, "/out", "rerun")
    assert f"({code})" in message and message.startswith("cannot write ")
    assert ("/data/part.parquet" if "part" in str(getattr(exc, "filename", "")) else "/out") in message
    with pytest.raises(KeyError):  # anything else is a bug: raised again, never disguised
        error_text(KeyError("x"), (ValueError,), "/out", "rerun")


def test_precompute_file_limit_is_named_and_the_rerun_resumes_byte_identical(train_setup, tmp_path, capsys):  # noqa: F811
    from wspo.precompute.cli import main

    out = tmp_path / "shards"
    argv = ["--dataset", "embedded", "--output_dir", str(out), "--max_samples", "48", "--slots", "chosen",
            "--max_length", str(SHARD_MAX_LENGTH), "--max_prompt_length", str(SHARD_MAX_PROMPT_LENGTH),
            "--backend", "hf", "--dtype", "float32", "--batch_tokens", "4096",
            "--weak_ref", str(train_setup["weak_ref"]), "--weak_aligned", str(train_setup["weak_aligned"])]
    models = snapshot(train_setup["weak_ref"])
    with file_size_limit(24_000):  # the sequences are written; the part (about 76 kB) is not
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"wspo-precompute: error: cannot write {out}" in err and EFBIG_TEXT in err
    assert "rerun the same command: the parts already written are kept" in err
    assert not list(out.glob("manifest*.json")) and not list(out.glob("data/*.parquet"))
    assert main(argv) == 0  # resumed
    assert snapshot(out / "data") == snapshot(train_setup["shards"] / "data")  # byte-identical to a clean run
    assert snapshot(train_setup["weak_ref"]) == models


def test_train_file_limit_during_a_checkpoint_save_is_named(train_setup, tmp_path, capsys):  # noqa: F811
    from wspo.train.checkpoints import checkpoint_problem
    from wspo.train.cli import main

    out = tmp_path / "run"
    argv = [str(a) for a in train_argv(train_setup, out, model_name_or_path=train_setup["weak_ref"], max_steps=2,
                                       save_strategy="steps", save_steps=2)]
    inputs = snapshot(train_setup["shards"]), snapshot(train_setup["weak_ref"])
    with file_size_limit(1_000_000):  # the row cache fits; the checkpoint's weights (2.4 MB) do not
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "wspo-train: error: cannot write " in err and EFBIG_TEXT in err
    assert "--resume_from_checkpoint true to go on from the newest complete checkpoint" in err
    assert not (out / "model.safetensors").exists() and not (out / "wspo_run.json").exists()
    assert checkpoint_problem(out / "checkpoint-2") is not None  # left incomplete, never taken for whole
    assert main(argv) == 0  # the rerun is not blocked by the incomplete checkpoint
    assert (out / "model.safetensors").exists() and checkpoint_problem(out / "checkpoint-2") is None
    assert (snapshot(train_setup["shards"]), snapshot(train_setup["weak_ref"])) == inputs


@contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (root only; the test skips elsewhere)."""
    import subprocess

    folder.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_precompute_read_only_remount_mid_run_is_named_and_the_rerun_resumes(tiny_models, tmp_path, capsys, monkeypatch):
    """The file system is remounted read-only (for real) just before the first shard part is written."""
    import subprocess

    import wspo.precompute.pipeline as pipeline
    from wspo.precompute.cli import main

    def argv(out: Path) -> list[str]:
        return ["--dataset", "embedded", "--output_dir", str(out), "--max_samples", "8", "--slots", "chosen",
                "--max_length", "128", "--max_prompt_length", "96", "--backend", "hf", "--dtype", "float32",
                "--rows_per_file", "4", "--weak_ref", str(tiny_models["weak_ref"]),
                "--weak_aligned", str(tiny_models["weak_aligned"])]

    assert main(argv(tmp_path / "clean")) == 0
    write_parquet = pipeline.write_parquet
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "set"

        def remount_then_write(table, path, metadata=None):
            if Path(str(path)).parent.name == "data":  # a shard part: the disk goes read-only under the run
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            return write_parquet(table, path, metadata)

        monkeypatch.setattr(pipeline, "write_parquet", remount_then_write)
        assert main(argv(out)) == 1
        err = capsys.readouterr().err
        assert f"wspo-precompute: error: cannot write {out}" in err
        assert "the file system is read-only (mounted or remounted read-only) (EROFS). Remount it read-write" in err
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        monkeypatch.setattr(pipeline, "write_parquet", write_parquet)
        assert not list(out.glob("manifest*.json")) and not list(out.glob("data/*.parquet"))
        assert main(argv(out)) == 0  # resumed: the sequences and scores on disk are kept
        assert snapshot(out / "data") == snapshot(tmp_path / "clean" / "data")


def test_train_full_disk_while_torch_saves_the_optimizer_is_named(train_setup, tmp_path, capsys):  # noqa: F811
    """A real ENOSPC where torch.save names no errno (`unexpected pos ...`): the file system is asked."""
    from wspo.train.checkpoints import checkpoint_problem
    from wspo.train.cli import main

    inputs = snapshot(train_setup["shards"]), snapshot(train_setup["weak_ref"])
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "run"
        argv = [str(a) for a in train_argv(train_setup, out, model_name_or_path=train_setup["weak_ref"], max_steps=2,
                                           save_strategy="steps", save_steps=2)]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"wspo-train: error: cannot write {out}: the disk is full (ENOSPC). Free space there" in err
        assert (out / "checkpoint-2" / "model.safetensors").exists()  # the weights fit, the optimizer state did not
        assert checkpoint_problem(out / "checkpoint-2") is not None and not (out / "model.safetensors").exists()
    assert (snapshot(train_setup["shards"]), snapshot(train_setup["weak_ref"])) == inputs


def test_eval_file_limit_keeps_the_previous_output_file(train_setup, tmp_path, capsys):  # noqa: F811
    from wspo.evaluation.cli import main

    out_file = tmp_path / "summary.json"
    out_file.write_text('{"previous": true}\n' + " " * 4000)  # an earlier result, larger than the limit
    before = out_file.read_bytes()
    argv = ["rewards", "--policy", str(train_setup["weak_aligned"]), "--reference", str(train_setup["weak_ref"]),
            "--dataset", "embedded", "--max_samples", "4", "--dtype", "float32", "--output_file", str(out_file)]
    with file_size_limit(1000):
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"wspo-eval rewards: error: cannot write {out_file}" in err and EFBIG_TEXT in err
    assert out_file.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_extrapolate_and_export_file_limit_leave_no_model_folder(train_setup, tmp_path, capsys):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from wspo.extrapolate.cli import main as extrapolate_main
    from wspo.train.export import main as export_main

    inputs = snapshot(train_setup["weak_ref"]), snapshot(train_setup["weak_aligned"])
    out = tmp_path / "expo"
    with file_size_limit(1_000_000):  # the weights (2.4 MB) cannot be written
        assert extrapolate_main(["--sft", str(train_setup["weak_ref"]), "--aligned", str(train_setup["weak_aligned"]),
                                 "--alpha", "0.3", "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"wspo-extrapolate: error: cannot write " in err and EFBIG_TEXT in err
    assert not list(out.glob("alpha-*"))  # nothing that looks like a model

    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(str(train_setup["weak_ref"]))
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(str(adapter))
    merged = tmp_path / "merged"
    with file_size_limit(1_000_000):
        assert export_main(["--adapter", str(adapter), "--output_dir", str(merged),
                            "--base_model", str(train_setup["weak_ref"])]) == 1
    err = capsys.readouterr().err
    assert "wspo-export: error: cannot write " in err and EFBIG_TEXT in err
    assert not merged.exists() or not [p for p in merged.iterdir() if p.name != ".export-partial"]
    assert (snapshot(train_setup["weak_ref"]), snapshot(train_setup["weak_aligned"])) == inputs


def test_shards_show_file_limit_writes_no_page(train_setup, tmp_path, capsys):  # noqa: F811
    from wspo.shards.cli import main

    page = tmp_path / "page.html"
    with file_size_limit(2000):
        assert main(["show", str(train_setup["shards"]), "--html", str(page), "-n", "3"]) == 1
    err = capsys.readouterr().err
    assert f"wspo-shards: error: cannot write " in err and EFBIG_TEXT in err
    assert not page.exists()


def _truncated_copy(model: Path, folder: Path) -> Path:
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return folder


@pytest.mark.parametrize("command", ["train", "eval rewards", "eval generate", "extrapolate", "export"])
def test_truncated_weights_are_named_by_every_command_that_loads_a_model(command, train_setup, tmp_path, capsys):  # noqa: F811
    cut = _truncated_copy(train_setup["weak_ref"], tmp_path / "cut")
    before = snapshot(cut)
    if command == "train":
        from wspo.train.cli import main

        status = main([str(a) for a in train_argv(train_setup, tmp_path / "out", model_name_or_path=cut)])
        option = "model_name_or_path"
    elif command.startswith("eval"):
        from wspo.evaluation.cli import main

        if command == "eval rewards":
            status = main(["rewards", "--policy", str(cut), "--reference", str(train_setup["weak_ref"]),
                           "--dataset", "embedded", "--max_samples", "2"])
            option = "policy"
        else:
            status = main(["generate", "--model", str(cut), "--dataset", "embedded", "--max_samples", "2",
                           "--output_file", str(tmp_path / "gen.json")])
            option = "model"
    elif command == "extrapolate":
        from wspo.extrapolate.cli import main

        status = main(["--sft", str(train_setup["weak_ref"]), "--aligned", str(cut), "--alpha", "0.3",
                       "--output_dir", str(tmp_path / "out")])
        option = "--aligned"
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from wspo.train.export import main

        adapter = tmp_path / "adapter"
        model = AutoModelForCausalLM.from_pretrained(str(train_setup["weak_ref"]))
        get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(str(adapter))
        status = main(["--adapter", str(adapter), "--output_dir", str(tmp_path / "out"), "--base_model", str(cut)])
        option = "--base_model"
    err = capsys.readouterr().err
    assert status == 1
    assert f"error: {option}: {cut / 'model.safetensors'} is truncated (" in err and "its header describes" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))
    assert snapshot(cut) == before


def test_eval_split_with_a_single_file_is_refused(train_setup, tmp_path, capsys):  # noqa: F811
    from wspo.embedded.sample import SAMPLE_DIR
    from wspo.evaluation.cli import main

    data = next(p for p in sorted(Path(SAMPLE_DIR).iterdir()) if p.suffix == ".jsonl")
    before = data.read_bytes()
    status = main(["rewards", "--policy", str(train_setup["weak_aligned"]), "--reference", str(train_setup["weak_ref"]),
                   "--dataset", str(data), "--dataset_split", "test_prefs", "--output_file", str(tmp_path / "o.json")])
    assert status == 1
    assert (f"dataset_split test_prefs: dataset {data} is a single file, which has no splits (it is read whole)"
            in capsys.readouterr().err)
    assert not (tmp_path / "o.json").exists() and data.read_bytes() == before
