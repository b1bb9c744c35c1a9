"""The trainer computes DESIGN section 1 exactly.

For one batch of shard rows, the WSPO loss is computed two ways:
  - the trainer's way: shards -> examples -> collated batch -> WSPOTrainer.compute_loss
    (rewards read from the shards, response-position log-probs, strong reference inside);
  - the slow direct way written here: tokenize each row, run a full forward of all four models
    (weak ref, weak aligned, strong ref, policy) one sequence at a time, log_softmax, gather, and
    apply the formula with Python loops.
Loss values must agree to 1e-5 (fp32) and so must the gradients of the policy's parameters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train_helpers import TRAIN_MAX_LENGTH, train_setup  # noqa: F401  (fixture)

from wspo.train.losses import pearson_from_sums, pearson_sums_by, sft_loss, wspo_loss

GAMMA = 0.1
BATCH = 4


# -- the loss functions on their own ------------------------------------------------------------


def test_wspo_loss_by_hand():
    policy = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5])
    ref = torch.tensor([-1.5, -2.0, -1.0, -2.0, -1.0])
    rewards = torch.tensor([0.1, -0.2, 0.05, 0.3, 0.0])
    seq_ids = torch.tensor([0, 0, 1, 1, 1])
    seq0 = ((0.1 * 0.5 - 0.1) ** 2 + (0.0 + 0.2) ** 2) / 2
    seq1 = ((0.1 * 0.5 - 0.05) ** 2 + (0.1 * -1.0 - 0.3) ** 2 + (0.1 * -0.5 - 0.0) ** 2) / 3
    loss = wspo_loss(policy, ref, rewards, seq_ids, 2, 0.1)
    assert abs(loss.item() - (seq0 + seq1) / 2) < 1e-7
    assert abs(sft_loss(policy).item() - 8.0 / 5) < 1e-7


def test_segments_of_one_token_are_the_token_loss():
    """The chunk form (issue 4) reduces to the token form when every chunk is one token, and
    summing log-ratios inside a chunk is what the chunk form means."""
    gen = torch.Generator().manual_seed(0)
    policy, ref, rewards = (torch.randn(7, generator=gen) for _ in range(3))
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    token = wspo_loss(policy, ref, rewards, seq_ids, 3, 0.1)
    chunked = wspo_loss(policy, ref, rewards, seq_ids, 3, 0.1, token_segments=torch.arange(7))
    assert torch.allclose(token, chunked)
    # Chunks {0,1} {2} | {3,4} | {5} {6}: three sequences, five segments.
    segments = torch.tensor([0, 0, 1, 2, 2, 3, 4])
    chunk_rewards = torch.tensor([0.2, -0.1, 0.4, 0.0, 0.3])
    chunk_seq = torch.tensor([0, 0, 1, 2, 2])
    lr = policy - ref
    by_hand = (((0.1 * (lr[0] + lr[1]) - 0.2) ** 2 + (0.1 * lr[2] + 0.1) ** 2) / 2
               + (0.1 * (lr[3] + lr[4]) - 0.4) ** 2
               + ((0.1 * lr[5]) ** 2 + (0.1 * lr[6] - 0.3) ** 2) / 2) / 3
    got = wspo_loss(policy, ref, chunk_rewards, chunk_seq, 3, 0.1, token_segments=segments)
    assert torch.allclose(got, by_hand)


def test_pearson_sums_add_up():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    y = y + 0.5 * x
    groups = (torch.arange(50) >= 20).long()  # two groups, summed: the statistics of all 50
    per_group = pearson_sums_by(x, y, groups, 2)
    assert per_group[:, 0].tolist() == [20.0, 30.0]
    sums = per_group.sum(0)
    expected = np.corrcoef(x.numpy(), y.numpy())[0, 1]
    assert abs(pearson_from_sums(sums) - expected) < 1e-10


# -- trainer vs. the direct computation ---------------------------------------------------------


def direct_logps(model, input_ids: list[int], prompt_length: int) -> torch.Tensor:
    """log p(token_t | tokens_<t) for the response positions, from a full forward of one sequence."""
    ids = torch.tensor([input_ids])
    logits = model(input_ids=ids).logits[0].float()  # [length, vocab]
    logps = torch.log_softmax(logits, dim=-1)
    positions = range(prompt_length, len(input_ids))
    return torch.stack([logps[t - 1, input_ids[t]] for t in positions])


def direct_wspo_loss(rows: list[dict], tokenizer, weak_ref, weak_aligned, strong_ref, policy) -> torch.Tensor:
    """DESIGN section 1, written out: L = mean over rows of 1/|y| sum_t (gamma*(lp - lref) - r_t)^2."""
    losses = []
    for row in rows:
        prompt_text = tokenizer.apply_chat_template(json.loads(row["messages"]), tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:TRAIN_MAX_LENGTH]
        with torch.no_grad():
            reward = direct_logps(weak_aligned, ids, len(prompt)) - direct_logps(weak_ref, ids, len(prompt))
            ref = direct_logps(strong_ref, ids, len(prompt))
        pol = direct_logps(policy, ids, len(prompt))
        terms = [(GAMMA * (pol[t] - ref[t]) - reward[t]) ** 2 for t in range(len(pol))]
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def trainer_batch_loss(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def shard_batch(setup):
    from wspo.models import load_tokenizer
    from wspo.train.batches import Collator
    from wspo.train.shard_sets import open_shard_sets, strong_rule
    from eager_examples import load_examples, split_examples

    sets = open_shard_sets([str(setup["shards"])], "wspo")
    tokenizer = load_tokenizer(setup["strong_sft"])
    rule, _ = strong_rule(sets, tokenizer, TRAIN_MAX_LENGTH, "none")
    examples, _ = load_examples(sets, rule, with_rewards=True)
    train, _ = split_examples(examples, 0.0)
    chosen = train[:BATCH]
    rows = sets[0].read_table(columns=["id", "messages", "response"]).to_pylist()
    by_id = {r["id"]: r for r in rows}
    return Collator(tokenizer.pad_token_id)(chosen), [by_id[e.row_id] for e in chosen], tokenizer, train


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trainer_loss_equals_direct_computation(train_setup, tmp_path, mode):  # noqa: F811
    from transformers import AutoModelForCausalLM, TrainingArguments

    from wspo.embedded.models import perturb_model
    from wspo.train.trainer import WSPOTrainer

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    batch, rows, tokenizer, train = shard_batch(train_setup)
    assert int(batch["target_mask"].sum()) == len(batch["rewards"]) > BATCH
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True)
    if mode == "full":
        # Policy != reference, as after some training: a perturbed copy of the strong SFT model.
        perturb_model(train_setup["strong_sft"], tmp_path / "policy", scale=0.01, seed=3)
        policy = load(tmp_path / "policy")
        trainer = WSPOTrainer(policy, args, loss="wspo", gamma=GAMMA, ref_model=load(train_setup["strong_sft"]), train_dataset=train)
    else:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        # init_lora_weights=False: B is random too, so the adapters already change the outputs.
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
        policy = get_peft_model(load(train_setup["strong_sft"]), lora)
        trainer = WSPOTrainer(policy, args, loss="wspo", gamma=GAMMA, train_dataset=train)
    policy.train()  # as in training (no dropout in these models, so train/eval give the same numbers)

    loss, grads = trainer_batch_loss(trainer, batch)

    direct = direct_wspo_loss(rows, tokenizer, load(train_setup["weak_ref"]), load(train_setup["weak_aligned"]),
                              load(train_setup["strong_sft"]), policy)
    direct.backward()
    direct_grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}

    assert loss.item() > 1e-3  # a real loss, not a trivial zero
    assert abs(loss.item() - direct.item()) < 1e-5, (loss.item(), direct.item())
    assert grads.keys() == direct_grads.keys() and len(grads) > 0
    if mode == "lora":
        assert all("lora_" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, direct_grads[name], rtol=1e-4, atol=1e-7, msg=name)
