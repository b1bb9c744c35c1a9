"""Packed batches (train/packing.py, DESIGN section 8) equal padded ones.

The same sequences, right-padded or packed into rows with position ids restarting per sequence,
must give the same per-sequence log-probs (< 1e-5, fp32) and the same WSPO, SFT, DPO and WRPO
losses and gradients, with reward projection (chunks) too; an attention implementation that
would let packed sequences see each other is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from test_train_dpo_wrpo import dpo_shards, preference_batch, wrpo_shards  # noqa: F401  (fixtures)
from test_train_helpers import TRAIN_MAX_LENGTH, train_argv, train_setup  # noqa: F401  (fixture)

from wspo.train.packing import (PackingError, check_packing_attention, pack_rows, pack_sequences,
                                packed_attention_is_exact, resolve_packing)

BATCH = 6
PACK_LENGTH = 2 * TRAIN_MAX_LENGTH  # several sequences per row, and more than one row


def load(path, attention="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attention)


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([3, 4, 2, 5, 1], 7) == [[3, 2], [1, 0], [4]]
    ids, positions, target, order = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]], [1, 1, 2, 1], 8)
    assert ids.tolist() == [[6, 7, 8, 9], [1, 2, 3, 0], [4, 5, 10, 11]] and order == [2, 0, 1, 3]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    # Response positions, row-major = `order`: [8, 9] of seq 2, [2, 3] of seq 0, [5] of seq 1, [11] of seq 3.
    assert ids[target].tolist() == [8, 9, 2, 3, 5, 11]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_logprobs_equal_padded(train_setup, attention):  # noqa: F811
    from wspo.logprobs import response_logprobs, right_pad
    from wspo.train.shard_sets import open_shard_sets, strong_rule
    from eager_examples import load_examples
    from wspo.models import load_tokenizer

    sets = open_shard_sets([str(train_setup["shards"])], "wspo")
    rule, _ = strong_rule(sets, load_tokenizer(train_setup["strong_sft"]), TRAIN_MAX_LENGTH, "none")
    examples = load_examples(sets, rule, with_rewards=True)[0][:BATCH]
    seqs, prompts = [e.input_ids for e in examples], [e.prompt_length for e in examples]
    model = load(train_setup["strong_sft"], attention).eval()
    padded = response_logprobs(model, *right_pad(seqs, prompts))
    ids, positions, target, order = pack_sequences(seqs, prompts, PACK_LENGTH, row_length=PACK_LENGTH)
    assert ids.shape[0] < len(seqs) and ids.shape[0] > 1 and (positions == 0).sum() > ids.shape[0]  # really packed
    packed = response_logprobs(model, ids, None, target, position_ids=positions)
    assert packed.shape == padded.shape == (sum(len(s) - p for s, p in zip(seqs, prompts)),)
    # Back in sequence order: each sequence's log-probs equal its padded ones.
    n = [len(s) - p for s, p in zip(seqs, prompts)]
    pieces = dict(zip(order, torch.split(packed, [n[i] for i in order])))
    assert float((torch.cat([pieces[i] for i in range(len(seqs))]) - padded).abs().max()) < 1e-5
    # Without position ids restarting, the second sequence of a row would see the first: the
    # check above is one that can fail.
    leaked = response_logprobs(model, ids, torch.ones_like(ids), target)
    assert float((leaked - padded).abs().max()) > 1e-2


def test_unsupported_attention_is_refused(train_setup):  # noqa: F811
    model = load(train_setup["strong_sft"])
    assert check_packing_attention(model) == "sdpa"
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(PackingError, match="'paged\\|sdpa'"):
        check_packing_attention(model)


class IgnoresPositionIds(torch.nn.Module):
    """A causal LM whose own code drops position_ids (as some remote-code models do): packed
    sequences then attend to each other under any attention implementation."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_packing_auto_packs_where_exact_and_pads_where_not(train_setup):  # noqa: F811
    model = load(train_setup["strong_sft"]).train()
    assert packed_attention_is_exact(model) and model.training  # the check leaves the mode as it was
    assert resolve_packing("auto", model) and resolve_packing("true", model)
    assert not resolve_packing("false", model)
    assert not resolve_packing("auto", model, zero3=True)  # partitioned weights: no check, so pad
    leaking = IgnoresPositionIds(model)
    assert not packed_attention_is_exact(leaking)
    assert not resolve_packing("auto", leaking)
    with pytest.raises(PackingError, match="packing true: the model's logits for two sequences packed into one row differ"):
        resolve_packing("true", leaking)
    model.config._attn_implementation = "paged|sdpa"
    assert not resolve_packing("auto", model)
    with pytest.raises(PackingError, match="'paged\\|sdpa'"):
        resolve_packing("true", model)


def test_packing_key_accepts_auto_true_false_and_bools():
    from wspo.train.config import WSPOArguments

    def packing(value, **keys):
        return WSPOArguments(model_name_or_path="m", shards=["s"], packing=value, **keys).packing

    assert packing("auto") == "auto" and packing(True) == "true" and packing(False) == "false"
    assert WSPOArguments(model_name_or_path="m", shards=["s"]).packing == "auto"
    with pytest.raises(ValueError, match="packing: 'yes'; choose from auto, true, false"):
        packing("yes")
    with pytest.raises(ValueError, match="packing_row_length is set but packing is false"):
        packing("false", packing_row_length=64)
    assert packing("auto", packing_row_length=64) == "auto"


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(padded, packed):
    (loss_a, grads_a), (loss_b, grads_b) = padded, packed
    assert loss_a.item() > 1e-4
    assert abs(loss_a.item() - loss_b.item()) < 1e-5, (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def wspo_trainer(setup, tmp_path, loss):
    from transformers import TrainingArguments

    from wspo.embedded.models import perturb_model
    from wspo.train.trainer import WSPOTrainer

    perturb_model(setup["strong_sft"], tmp_path / "policy", scale=0.01, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True)
    reference = load(setup["strong_sft"]) if loss == "wspo" else None
    return WSPOTrainer(load(tmp_path / "policy"), args, loss=loss, gamma=0.1, ref_model=reference, train_dataset=[1])


@pytest.mark.parametrize("loss,project", [("wspo", False), ("sft", False), ("wspo", True)])
def test_wspo_sft_loss_and_grads_packed_equal_padded(train_setup, tmp_path, loss, project):  # noqa: F811
    from wspo.models import load_tokenizer
    from wspo.train.batches import Collator
    from wspo.train.shard_sets import open_shard_sets, strong_rule
    from eager_examples import load_examples

    sets = open_shard_sets([str(train_setup["shards"])], "wspo")
    tokenizer = load_tokenizer(train_setup["strong_sft"])
    rule, _ = strong_rule(sets, tokenizer, TRAIN_MAX_LENGTH, "chunks")
    # project: the chunk path (DESIGN section 5) forced on one tokenizer, as in test_train_projection.
    examples = load_examples(sets, rule, with_rewards=loss == "wspo", project=project)[0][:BATCH]
    if project:
        assert examples[0].token_segments is not None
    trainer = wspo_trainer(train_setup, tmp_path, loss)
    padded_batch = Collator(tokenizer.pad_token_id)(examples)
    packed_batch = Collator(tokenizer.pad_token_id, PACK_LENGTH, PACK_LENGTH)(examples)
    assert "attention_mask" not in packed_batch and packed_batch["input_ids"].shape[0] < BATCH
    assert packed_batch["input_ids"].numel() <= padded_batch["input_ids"].numel()
    assert_same(loss_and_grads(trainer, padded_batch), loss_and_grads(trainer, packed_batch))


@pytest.mark.parametrize("loss", ["dpo", "wrpo"])
def test_preference_loss_and_grads_packed_equal_padded(train_setup, dpo_shards, wrpo_shards, tmp_path, loss):  # noqa: F811
    from transformers import TrainingArguments

    from wspo.embedded.models import perturb_model
    from wspo.train.pairs import PreferenceCollator
    from wspo.train.trainer import WSPOTrainer

    padded_batch, _, tokenizer, examples, _ = preference_batch(train_setup, dpo_shards if loss == "dpo" else wrpo_shards, loss,
                                                               tmp_path / "cache")
    packed_batch = PreferenceCollator(tokenizer.pad_token_id, PACK_LENGTH, PACK_LENGTH)(examples[:4])
    assert packed_batch["input_ids"].shape[0] < padded_batch["input_ids"].shape[0]
    perturb_model(train_setup["strong_sft"], tmp_path / "policy", scale=0.02, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = WSPOTrainer(load(tmp_path / "policy"), args, loss=loss, beta=0.5, wrpo_alpha=0.3, wrpo_alpha_schedule="fixed",
                          reference_from_shards=True, train_dataset=examples)
    assert_same(loss_and_grads(trainer, padded_batch), loss_and_grads(trainer, packed_batch))


def test_cli_trains_packed_like_padded(train_setup, tmp_path):  # noqa: F811
    """Two optimizer steps and an evaluation through wspo-train: padded, packed into rows of
    max_length on sdpa's block mask (attn_implementation named), and the default (packing and
    attention auto: one row per micro-batch, attention per sequence, the frozen reference alike)
    log the same losses and held-out losses; no saved config names the toolkit's attention."""
    import json

    from wspo.sequence_attention import PER_SEQUENCE_SDPA
    from wspo.train.cli import main

    variants = {"false": {"packing": "false"},
                "rows": {"packing": "true", "packing_row_length": TRAIN_MAX_LENGTH, "attn_implementation": "sdpa"},
                "auto": {}}
    expected = {"false": ("padded", "sdpa", None),
                "rows": ("packed", "sdpa", f"{TRAIN_MAX_LENGTH} tokens"),
                "auto": ("packed", PER_SEQUENCE_SDPA, "one per micro-batch")}
    losses, evals = {}, {}
    for name, keys in variants.items():
        out = tmp_path / name
        assert main(train_argv(train_setup, out, max_steps=2, eval_fraction=0.25, eval_strategy="steps", eval_steps=2,
                               **keys)) == 0
        record = json.loads((out / "wspo_run.json").read_text())
        data = record["data"]
        assert (data["batches"], data["attention"], data["packed_rows"]) == expected[name]
        assert record["model"]["reference"] == "frozen copy"
        assert PER_SEQUENCE_SDPA not in (out / "config.json").read_text()
        losses[name] = [h["loss"] for h in record["log_history"] if "loss" in h]
        evals[name] = [h["eval_loss"] for h in record["log_history"] if "eval_loss" in h]
    assert len(losses["auto"]) == 2 and len(evals["auto"]) >= 1
    for name in ("rows", "auto"):
        assert losses[name] == pytest.approx(losses["false"], abs=1e-5)
        assert evals[name] == pytest.approx(evals["false"], abs=1e-5)


@pytest.mark.slow
def test_cli_trains_compiled_like_eager(train_setup, tmp_path):  # noqa: F811
    """`--torch_compile true` (transformers' keys): the Trainer compiles the policy and WSPOTrainer
    the frozen reference's decoder, with the same backend; two WSPO steps log the eager run's losses."""
    import json

    from wspo.train.cli import main

    losses = {}
    for compiled in ("false", "true"):
        out = tmp_path / compiled
        # aot_eager: dynamo's capture and AOTAutograd's backward, as inductor gets them, without
        # inductor's C++ code generation (a minute on 2 cores; the scorer tests cover inductor)
        keys = {"torch_compile_backend": "aot_eager"} if compiled == "true" else {}
        assert main(train_argv(train_setup, out, max_steps=2, torch_compile=compiled, **keys)) == 0
        record = json.loads((out / "wspo_run.json").read_text())
        assert record["model"]["reference"] == "frozen copy"
        losses[compiled] = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert len(losses["true"]) == 2
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
