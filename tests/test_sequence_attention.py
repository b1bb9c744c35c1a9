"""Attention one sequence at a time (common/sequence_attention.py): a micro-batch packed into one
row without padding gives the padded batch's log-probs, losses and gradients; models where it
would not be the same attention keep sdpa."""

from __future__ import annotations

import pytest
import torch
from test_train_helpers import TRAIN_MAX_LENGTH, train_argv, train_setup  # noqa: F401  (fixture)
from test_train_packing import BATCH, IgnoresPositionIds, assert_same, load, loss_and_grads, wspo_trainer

from wspo.sequence_attention import PER_SEQUENCE_SDPA, sequence_bounds, use_per_sequence_attention
from wspo.train.packing import pack_sequences


def examples_of(setup, with_rewards=True):
    from eager_examples import load_examples
    from wspo.models import load_tokenizer
    from wspo.train.shard_sets import open_shard_sets, strong_rule

    sets = open_shard_sets([str(setup["shards"])], "wspo")
    tokenizer = load_tokenizer(setup["strong_sft"])
    rule, _ = strong_rule(sets, tokenizer, TRAIN_MAX_LENGTH, "none")
    return load_examples(sets, rule, with_rewards=with_rewards)[0][:BATCH], tokenizer


def test_sequence_bounds_follow_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
    assert sequence_bounds(positions) == [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]
    assert sequence_bounds(positions) is sequence_bounds(positions)  # read once per forward, not per layer
    assert sequence_bounds(positions.clone()) == [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]


@torch.no_grad()
def test_one_row_logprobs_equal_padded_and_sdpa_packed(train_setup):  # noqa: F811
    from wspo.logprobs import response_logprobs, right_pad

    examples, _ = examples_of(train_setup)
    seqs, prompts = [e.input_ids for e in examples], [e.prompt_length for e in examples]
    model = load(train_setup["strong_sft"]).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    padded = response_logprobs(model, *right_pad(seqs, prompts))
    ids, positions, target, order = pack_sequences(seqs, prompts, TRAIN_MAX_LENGTH, one_row=True)
    assert ids.shape == (1, sum(map(len, seqs)))  # one row, not one pad
    sdpa_one_row = response_logprobs(model, ids, None, target, position_ids=positions)

    assert use_per_sequence_attention(model) and model.config._attn_implementation == PER_SEQUENCE_SDPA
    one_row = response_logprobs(model, ids, None, target, position_ids=positions)
    n = [len(s) - p for s, p in zip(seqs, prompts)]
    pieces = dict(zip(order, torch.split(one_row, [n[i] for i in order])))
    assert float((torch.cat([pieces[i] for i in range(len(seqs))]) - padded).abs().max()) < 1e-5
    assert float((one_row - sdpa_one_row).abs().max()) < 1e-5
    # Padded batches keep sdpa's masked path on the switched model.
    assert float((response_logprobs(model, *right_pad(seqs, prompts)) - padded).abs().max()) == 0.0
    # The check can fail: the row read as one sequence (positions not restarting) leaks.
    leaked = response_logprobs(model, ids, None, target, position_ids=torch.arange(ids.shape[1])[None])
    assert float((leaked - sdpa_one_row).abs().max()) > 1e-2


@pytest.mark.parametrize("loss", ["wspo", "sft"])
def test_one_row_loss_and_grads_equal_padded(train_setup, tmp_path, loss):  # noqa: F811
    from wspo.train.batches import Collator

    examples, tokenizer = examples_of(train_setup, with_rewards=loss == "wspo")
    trainer = wspo_trainer(train_setup, tmp_path, loss)
    padded_batch = Collator(tokenizer.pad_token_id)(examples)
    padded = loss_and_grads(trainer, padded_batch)
    assert use_per_sequence_attention(trainer.model, trainer.ref_model)
    assert trainer.ref_model is None or trainer.ref_model.config._attn_implementation == PER_SEQUENCE_SDPA
    one_row_batch = Collator(tokenizer.pad_token_id, TRAIN_MAX_LENGTH, one_row=True)(examples)
    assert one_row_batch["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    assert_same(padded, loss_and_grads(trainer, one_row_batch))


def test_models_it_would_change_keep_sdpa(train_setup, tmp_path):  # noqa: F811
    model = load(train_setup["strong_sft"])
    assert not use_per_sequence_attention(model, load(train_setup["strong_sft"], "eager"))
    assert model.config._attn_implementation == "sdpa"
    windowed = load(train_setup["strong_sft"])
    windowed.config.layer_types = ["sliding_attention"] * len(windowed.config.layer_types)
    assert not use_per_sequence_attention(windowed)
    # A model whose own code drops position ids: its packed logits differ from sdpa's apart, so
    # the switch is undone (both models), with a warning.
    leaking = IgnoresPositionIds(load(train_setup["strong_sft"]))
    assert not use_per_sequence_attention(model, leaking)
    assert model.config._attn_implementation == "sdpa" and leaking.config._attn_implementation == "sdpa"
    # A saved model does not name the toolkit's attention (it must load anywhere).
    assert use_per_sequence_attention(model)
    model.save_pretrained(tmp_path / "saved")
    assert PER_SEQUENCE_SDPA not in (tmp_path / "saved" / "config.json").read_text()


def test_a_named_attention_transformers_refuses_is_named(train_setup, tmp_path, capsys):  # noqa: F811
    """(A named one that loads is used as given: test_train_packing.test_cli_trains_packed_like_padded.)"""
    from wspo.train.cli import main

    assert main(train_argv(train_setup, tmp_path / "bad", max_steps=1, loss="sft", attn_implementation="no_such")) == 1
    err = capsys.readouterr().err
    assert "attn_implementation 'no_such'" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_length_batches_count_padded_or_real_tokens():
    from wspo.precompute.scorers import length_batches

    assert length_batches([5, 3, 2, 2], 8) == [[0], [1, 2], [3]]  # padded: the longest times the rows
    assert length_batches([5, 3, 2, 2], 8, padded=False) == [[0, 1], [2, 3]]  # one row: the tokens
    assert length_batches([9, 2], 8, padded=False) == [[0], [1]]  # too long for the budget: alone


def test_precompute_attention_key(tiny_models, tmp_path):
    """wspo-precompute --attn_implementation: hf only; a name transformers refuses is named; a
    named one gives padded batches (the scorer keeps it as given)."""
    from wspo.errors import ConfigError
    from wspo.precompute.config import PrecomputeArguments
    from wspo.precompute.scorers import HFScorer

    with pytest.raises(ValueError, match="attn_implementation applies to the hf backend"):
        PrecomputeArguments(output_dir=str(tmp_path), weak_ref="a", weak_aligned="b", backend="vllm",
                            attn_implementation="sdpa")
    with pytest.raises(ConfigError, match="attn_implementation 'no_such'"):
        HFScorer(tiny_models["weak_ref"], dtype="float32", device="cpu", attn_implementation="no_such")
    scorer = HFScorer(tiny_models["weak_ref"], dtype="float32", device="cpu", attn_implementation="eager")
    try:
        assert not scorer.one_row and scorer.model.config._attn_implementation == "eager"
    finally:
        scorer.close()
