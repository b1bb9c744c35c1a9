"""`wspo-train` and `wspo-export` end to end on the tiny set-up, and the errors users can get."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_train_helpers import precompute, train_argv, train_setup  # noqa: F401  (fixture)

from wspo.train.cli import main as train_main


def run_train(capsys, argv) -> tuple[int, str]:
    rc = train_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def error_line(err: str) -> str:
    """The CLI's one error line (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("wspo-train: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- the happy path -----------------------------------------------------------------------------


@pytest.mark.slow
def test_train_end_to_end_without_weak_models(train_setup, tmp_path, capsys):  # noqa: F811
    """Phase one with copies of the weak models, the copies deleted, then phase two: it reads only
    the shards and the strong model. 40 full fine-tuning steps at lr 1e-3 on 48 rows (about three
    epochs) bring the WSPO loss down by about 45% (0.105 -> 0.056 on this set-up) and the per-token
    correlation of weak reward and scaled strong log-ratio from about 0.2 to 0.7; we assert a 25% drop."""
    from transformers import AutoModelForCausalLM

    from wspo.shards.store import ShardSet

    weak = tmp_path / "weak"
    for name in ("weak_ref", "weak_aligned"):
        shutil.copytree(train_setup[name], weak / name)
    shards = precompute(tmp_path / "shards", weak / "weak_ref", weak / "weak_aligned")
    shutil.rmtree(weak)

    out = tmp_path / "run"
    rc, err = run_train(capsys, train_argv(train_setup, out, shards=shards, max_steps=40, eval_fraction=0.1,
                                           eval_strategy="steps", eval_steps=20))
    assert rc == 0, err

    record = json.loads((out / "wspo_run.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in wspo_run.json"))
    train_logs = [h for h in record["log_history"] if "loss" in h]
    losses = [h["loss"] for h in train_logs]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    for key in ("reward_mean", "scaled_logratio_mean", "reward_logratio_pearson", "response_tokens_per_second", "grad_norm"):
        assert key in train_logs[-1], key
    assert train_logs[-1]["reward_logratio_pearson"] > train_logs[1]["reward_logratio_pearson"]
    assert "eval_loss" in record["metrics"]["final"] and "eval_reward_logratio_pearson" in record["metrics"]["final"]

    shard_set = ShardSet.open(shards)
    assert record["shards"][0]["fingerprint"] == shard_set.fingerprint
    assert record["shards"][0]["tokenizer_fingerprint"] == shard_set.tokenizer["fingerprint"]
    assert record["model"]["tokenizer_fingerprint"] == shard_set.tokenizer["fingerprint"]
    assert record["config"]["wspo"]["gamma"] == 0.1 and record["config"]["training"]["max_steps"] == 40
    assert record["data"]["train_rows"] + record["data"]["eval_rows"] == shard_set.num_rows
    assert record["data"]["eval_rows"] > 0

    # A full model in safetensors with its tokenizer, different from where it started.
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(str(train_setup["strong_sft"]), dtype=torch.float32)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)


def test_gradient_accumulation_matches_one_big_batch(train_setup, tmp_path, capsys):  # noqa: F811
    """2 micro-batches of 2 with accumulation = 1 batch of 4: the same rows, the same per-sequence
    mean (the Trainer divides each micro-batch's mean by 2), so the same loss and weights
    (tolerance 1e-6 on the loss, 1e-5 per weight: only the summation order differs). Padded
    batches: packed ones lay out 4 and 2 sequences differently, which is a second order of sums."""
    from safetensors.torch import load_file

    big, small = tmp_path / "big", tmp_path / "accumulated"
    assert run_train(capsys, train_argv(train_setup, big, max_steps=2, per_device_train_batch_size=4, packing="false"))[0] == 0
    assert run_train(capsys, train_argv(train_setup, small, max_steps=2, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=2, packing="false"))[0] == 0
    losses = [[h["loss"] for h in json.loads((d / "wspo_run.json").read_text())["log_history"] if "loss" in h] for d in (big, small)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    a, b = load_file(str(big / "model.safetensors")), load_file(str(small / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name


def test_held_out_split_is_by_example():
    import numpy as np

    from wspo.train.examples import Example
    from eager_examples import split_examples

    # Two responses per example (as from two shard sets): both always land on the same side.
    examples = [Example(0, f"row{i}-{k}", f"ex{i}", [1, 2], 1, np.zeros(1, np.float32)) for i in range(400) for k in range(2)]
    train, held_out = split_examples(examples, 0.25)
    assert {e.example_id for e in train}.isdisjoint({e.example_id for e in held_out})
    assert 0.18 < len(held_out) / len(examples) < 0.32
    assert [e.index for e in held_out] == list(range(len(held_out)))
    again, _ = split_examples(examples, 0.25)
    assert [e.row_id for e in again] == [e.row_id for e in train]  # deterministic


def test_sft_loss_and_lora_export(train_setup, tmp_path, capsys):  # noqa: F811
    """SFT with LoRA, then wspo-export: the merged model's log-probs equal the PEFT model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from wspo.logprobs import response_logprobs
    from wspo.train.export import main as export_main

    out = tmp_path / "lora"
    rc, err = run_train(capsys, train_argv(train_setup, out, loss="sft", use_lora="true", learning_rate=1e-2, max_steps=3))
    assert rc == 0, err
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    record = json.loads((out / "wspo_run.json").read_text())
    assert record["model"]["saved"] == "lora_adapter"
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(3.0 < loss < 9.0 for loss in losses)  # NLL of a random 2048-token model: about ln(2048) = 7.6

    merged_dir = tmp_path / "merged"
    assert export_main(["--adapter", str(out), "--output_dir", str(merged_dir)]) == 0
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()
    assert not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(train_setup["strong_sft"]), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(out)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2048, (3, 40), generator=gen)
    mask = torch.ones_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 10:] = True
    with torch.no_grad():
        got, want = response_logprobs(merged, ids, mask, target), response_logprobs(peft, ids, mask, target)
        with peft.disable_adapter():
            untrained = response_logprobs(peft, ids, mask, target)
    assert (want - untrained).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    assert export_main(["--adapter", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x")]) == 1
    assert "not a LoRA adapter directory" in capsys.readouterr().err


def test_recipes_parse():
    """Every configs/train_*.yaml holds only known keys (bf16 recipes parsed with bf16 off: no GPU here)."""
    from transformers import TrainingArguments

    from wspo.args import parse_config
    from wspo.train.config import WSPOArguments

    configs = sorted((Path(__file__).parents[1] / "configs").glob("train_*.yaml"))
    assert {p.name for p in configs} >= {"train_tiny.yaml", "train_wspo_qwen2_7b_lora.yaml", "train_wspo_qwen2_7b_full.yaml"}
    for path in configs:
        args, training = parse_config([WSPOArguments, TrainingArguments], [str(path), "--bf16", "false", "--use_cpu", "true"])
        assert args.gamma == 0.1 and (args.loss == "wspo" or path.name in ("train_wrpo.yaml", "train_dpo_weak.yaml"))
    lora, _ = parse_config([WSPOArguments, TrainingArguments], [str(path.parent / "train_wspo_qwen2_7b_lora.yaml"), "--bf16", "false", "--use_cpu", "true"])
    assert lora.use_lora and lora.lora_r == 8 and lora.max_length == 4096


def test_console_scripts_installed():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["wspo-train"] == "wspo.train.cli:main"
    assert scripts["wspo-export"] == "wspo.train.export:main"


# -- bad input ----------------------------------------------------------------------------------


def test_shards_that_do_not_verify(train_setup, tmp_path, capsys):  # noqa: F811
    shards = tmp_path / "shards"
    shutil.copytree(train_setup["shards"], shards)
    part = next(shards.glob("data/part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "out", shards=shards))
    line = error_line(err)
    assert rc == 1 and "does not verify" in err and part.name in err and "sha256" in err, line

    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "out", shards=tmp_path / "missing"))
    assert rc == 1 and "no such shard directory" in error_line(err)

    from wspo.train.shard_sets import DataError, open_shard_sets

    with pytest.raises(DataError, match="given more than once"):
        open_shard_sets([str(train_setup["shards"]), str(train_setup["shards"]) + "/"], "wspo")


def test_strong_tokenizer_differs_from_shards(train_setup, tmp_path, capsys):  # noqa: F811
    from wspo.embedded.models import build_model, build_tokenizer

    build_tokenizer(tmp_path / "other_tokenizer", vocab_size=1024)
    build_model(tmp_path / "other_strong", tmp_path / "other_tokenizer", size="weak")
    argv = train_argv(train_setup, tmp_path / "out", model_name_or_path=tmp_path / "other_strong")
    rc, err = run_train(capsys, argv)
    line = error_line(err)
    assert rc == 1 and "differs from the tokenizer the shards were scored with" in line
    assert "--reward_projection chunks" in line

    # Allowed: the rewards are projected onto chunks (tests/test_train_projection.py checks the numbers).
    rc, err = run_train(capsys, argv + ["--reward_projection", "chunks"])
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "wspo_run.json").read_text())["data"]["reward_projection"] == "chunks"


def test_retokenization_mismatch_names_the_row(train_setup, tmp_path, capsys):  # noqa: F811
    """A shard row whose stored token_ids are not what the (same) tokenizer gives: the file is
    rewritten and the manifest updated, so the set verifies and only the ids are wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wspo.shards.store import file_record, write_json, write_manifest, write_parquet

    shards = tmp_path / "shards"
    shutil.copytree(train_setup["shards"], shards)
    part = next(shards.glob("data/part-*.parquet"))
    table = pq.read_table(part)
    token_ids = table["token_ids"].to_pylist()
    token_ids[5][2] = (token_ids[5][2] + 1) % 1000
    table = table.set_column(table.schema.get_field_index("token_ids"), table.schema.field("token_ids"),
                             pa.array(token_ids, pa.list_(pa.int32())))
    write_parquet(table, part, {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()})
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["files"][0] = file_record(part, manifest["files"][0]["tokens"], root=shards)
    write_manifest(manifest, shards / "manifest.json")  # a consistent set whose ids no longer re-tokenize
    bad_row = table["id"][5].as_py()

    # Rows are checked as they are drawn (train/rows.py): one epoch draws every row, the bad one too.
    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "out", shards=shards, max_steps=-1, num_train_epochs=1))
    line = error_line(err)
    assert rc == 1 and bad_row in line and "first difference at token 2" in line, line
    assert not (tmp_path / "out" / "wspo_run.json").exists()


def test_loss_needs_what_the_shards_hold(train_setup, tmp_path, capsys):  # noqa: F811
    """Shards scored by weak_ref alone have no reward: wspo refuses them, sft trains on them."""
    shards = precompute(tmp_path / "ref_only", train_setup["weak_ref"], None, samples=8)
    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "out", shards=shards))
    line = error_line(err)
    assert rc == 1 and "no `reward` column" in line and "weak_ref" in line and "--loss sft" in line

    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "sft", shards=shards, loss="sft", max_steps=1))
    assert rc == 0, err


def test_empty_selection_of_rows(train_setup, tmp_path, capsys):  # noqa: F811
    shards = precompute(tmp_path / "rejected_only", train_setup["weak_ref"], train_setup["weak_aligned"],
                        samples=8, slots="rejected")
    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "out", shards=shards))
    line = error_line(err)
    assert rc == 1 and "no chosen rows" in line and "rejected" in line, line


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"loss": "ppo"}, "loss: 'ppo'"),
        ({"eval_fraction": 1.5}, "eval_fraction must be in [0, 1)"),
        ({"eval_fraction": 0.0, "eval_strategy": "steps"}, "no held-out rows"),
        ({"model_name_or_path": "/nonexistent/model"}, "model_name_or_path"),
    ],
)
def test_bad_settings_are_one_line_errors(train_setup, tmp_path, capsys, keys, message):  # noqa: F811
    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "out", **keys))
    assert rc == 1 and message in error_line(err)


def test_full_fine_tuning_with_bf16_mixed_precision(train_setup, tmp_path, capsys):  # noqa: F811
    """fp32 weights, bf16 autocast (accelerate wraps the model's forward only): the log-prob
    self-check must accept the mixed-precision logits, and the run must train."""
    rc, err = run_train(capsys, train_argv(train_setup, tmp_path / "out", bf16="true", max_steps=2))
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "wspo_run.json").read_text())
    assert record["config"]["training"]["bf16"] is True
    assert all(math.isfinite(h["loss"]) for h in record["log_history"] if "loss" in h)
