"""Non-finite results are never published as finished, and bad numbers are refused up front."""

from __future__ import annotations

import pytest

from wspo.precompute.config import PrecomputeArguments
from wspo.precompute.pipeline import run as precompute
from wspo.train.cli import main as train_main


@pytest.fixture(scope="module")
def sft_shards(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    precompute(PrecomputeArguments(output_dir=str(out), ref_model=str(tiny_models["weak_ref"]), max_samples=24,
                                   max_length=256, max_prompt_length=192, rows_per_file=64, batch_tokens=2048))
    return out


def train(tiny_models, shards, out, *extra) -> list[str]:
    return ["--loss", "sft", "--model_name_or_path", str(tiny_models["weak_ref"]), "--shards", str(shards),
            "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
            "--save_steps", "2", "--logging_steps", "1", "--report_to", "none", "--eval_fraction", "0",
            "--disable_tqdm", "true", "--use_cpu", "true", *extra]


def test_an_exploding_learning_rate_stops_naming_the_step_and_writes_no_final_model(tiny_models, sft_shards, tmp_path, capsys):
    out = tmp_path / "run"
    status = train_main(train(tiny_models, sft_shards, out, "--learning_rate", "5e7", "--max_grad_norm", "0"))
    err = capsys.readouterr().err
    assert status == 1
    assert "wspo-train: error: training stopped at step " in err and "is NaN or infinite" in err
    step = int(err.split("training stopped at step ")[1].split(":")[0])
    assert step >= 2  # the first step's update is what overflows
    assert not (out / "model.safetensors").exists() and not (out / "wspo_run.json").exists()
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert all(int(name.split("-")[1]) < step for name in kept)  # earlier checkpoints stay, nothing after


@pytest.mark.parametrize("option, value, message", [
    ("--gamma", "nan", "gamma must be finite and positive, got nan"),
    ("--gamma", "-1", "gamma must be finite and positive"),
    ("--beta", "inf", "beta must be finite and positive, got inf"),
    ("--learning_rate", "nan", "learning_rate must be finite and positive, got nan"),
    ("--learning_rate", "0", "learning_rate must be finite and positive, got 0"),
])
def test_train_options_checked_up_front(option, value, message, tiny_models, sft_shards, tmp_path, capsys):
    status = train_main(train(tiny_models, sft_shards, tmp_path / "run", option, value))
    assert status == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value", [("max_samples", -1), ("max_samples", 0), ("rows_per_file", 0),
                                           ("batch_tokens", -5), ("max_prompt_length", 0)])
def test_counts_that_make_no_sense_are_refused_naming_the_option(option, value, tiny_models, tmp_path):
    with pytest.raises(ValueError, match=option):
        PrecomputeArguments(output_dir=str(tmp_path), weak_ref="a", weak_aligned="b", **{option: value})


def test_eval_max_samples_refused(tmp_path):
    from wspo.evaluation.config import GenerateArguments

    with pytest.raises(ValueError, match="max_samples must be a positive number of rows"):
        GenerateArguments(model="m", output_file=str(tmp_path / "o.json"), dataset="embedded", max_samples=-1)


def test_resume_takes_the_newest_complete_checkpoint(tiny_models, sft_shards, tmp_path, capsys):
    from wspo.train.checkpoints import resolve_resume

    out = tmp_path / "run"
    assert train_main(train(tiny_models, sft_shards, out, "--learning_rate", "1e-3")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # A kill while checkpoint-6 was written: its weights are cut short.
    weights = next(p for p in (out / "checkpoint-6").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # and one interrupted earlier
    capsys.readouterr()
    assert resolve_resume("true", str(out)) == str(out / "checkpoint-2")
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoint-2'}" in err
    assert "checkpoint-6: " in err and "unreadable" in err and "checkpoint-4: trainer_state.json is missing" in err
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(out / "checkpoint-6"), str(out))


def test_a_failed_final_save_publishes_no_weights(tiny_models, sft_shards, tmp_path, capsys, monkeypatch):
    import transformers

    original = transformers.Trainer.save_model

    def full_disk(self, output_dir=None, _internal_call=False):
        original(self, output_dir, _internal_call)
        if output_dir and output_dir.endswith(".final-partial"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "save_model", full_disk)
    out = tmp_path / "run"
    assert train_main(train(tiny_models, sft_shards, out, "--learning_rate", "1e-3", "--save_strategy", "no")) == 1
    assert "could not write the final model" in capsys.readouterr().err
    # No weights, no tokenizer, no half-written folder (the hidden row cache of the data and the
    # run's identity, written when it started, may stay).
    assert sorted(p.name for p in out.iterdir() if p.name not in (".wspo_cache", "wspo_identity.json")) == []
