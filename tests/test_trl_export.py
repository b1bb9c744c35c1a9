"""Shard sets that TRL's DPOTrainer trains on (`ShardSet.to_trl_dpo`, `wspo-shards export --format trl-dpo`).

- TRL 1.16's DPOTrainer, run for real on the exported set with the shards' reference sums (no
  reference model), gives the first-step loss and gradients of `wspo-train --loss dpo` on the same
  batch (every pair of the set, no shuffling) to 1e-5 in fp32;
- a chat template that writes text after the end-of-turn token (ChatML's newline), or a
  sequence TRL would cut, refuses the export, saying what differs.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_train_helpers import train_setup  # noqa: F401  (fixture)

pytest.importorskip("trl")

from wspo.shards.store import ShardError, ShardSet  # noqa: E402

MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 192
BETA = 0.1
# ChatML without the newline after each turn: the rendered assistant turn ends with <|im_end|>,
# the shards' end-of-turn token, so TRL's completion is exactly the shards' response tokens.
CHATML_NO_NEWLINE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def dpo_shards(out: Path, ref_model: Path, samples: int) -> ShardSet:
    from wspo.precompute.cli import main

    assert main(["--dataset", "embedded", "--output_dir", str(out), "--max_samples", str(samples),
                 "--slots", "chosen,rejected", "--ref_model", str(ref_model), "--max_length", str(MAX_LENGTH),
                 "--max_prompt_length", str(MAX_PROMPT_LENGTH), "--dtype", "float32", "--disable_tqdm", "true"]) == 0
    return ShardSet.open(out)


@pytest.fixture(scope="module")
def plain(train_setup, tmp_path_factory):  # noqa: F811
    """The strong SFT model with the newline-free template, a DPO shard set it scored as the
    reference, and a perturbed copy as the policy (policy != reference, as after some training)."""
    from transformers import AutoTokenizer

    from wspo.embedded.models import perturb_model

    root = tmp_path_factory.mktemp("trl")
    model = root / "strong_plain"
    shutil.copytree(train_setup["strong_sft"], model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.chat_template = CHATML_NO_NEWLINE
    tokenizer.save_pretrained(str(model))
    perturb_model(model, root / "policy", scale=0.02, seed=3)
    return {"model": model, "policy": root / "policy", "shards": dpo_shards(root / "shards", model, 8), "root": root}


def wspo_loss_and_grads(plain, tmp_path):
    """`wspo-train --loss dpo`'s loss on every pair of the set, one batch, and its gradients."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from wspo.models import load_tokenizer
    from wspo.train.shard_sets import open_shard_sets, reference_sets, strong_rule
    from wspo.train.pairs import PreferenceCollator, pair_datasets
    from wspo.train.trainer import WSPOTrainer

    paths = [str(plain["shards"].root)]
    sets = open_shard_sets(paths, "dpo")
    rule, _ = strong_rule(sets, load_tokenizer(plain["model"]), MAX_LENGTH, "none")
    ref_sets = reference_sets(paths, sets, plain["model"], rule, "ref")
    dataset, _, _ = pair_datasets(sets, rule, "dpo", ref_sets, 0.0, tmp_path / "cache", Counter())
    examples = [dataset[i] for i in range(len(dataset))]
    policy = AutoModelForCausalLM.from_pretrained(str(plain["policy"]), dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "wspo"), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = WSPOTrainer(policy, args, loss="dpo", beta=BETA, reference_from_shards=True, train_dataset=examples)
    policy.train()
    batch = PreferenceCollator(rule.tokenizer.pad_token_id)(examples)
    loss = trainer.compute_loss(policy, trainer._prepare_inputs(batch))
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in policy.named_parameters()}, len(examples)


def trl_loss_and_grads(plain, dataset, tmp_path):
    """TRL's DPOTrainer on the exported set: the same batch, through its own tokenization,
    collator and loss, with the reference sums read from the dataset."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from wspo.models import load_tokenizer
    from wspo.shards.trl_export import DPOTrainerFromShards

    policy = AutoModelForCausalLM.from_pretrained(str(plain["policy"]), dtype=torch.float32)
    config = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, beta=BETA, max_length=None,
                       per_device_train_batch_size=len(dataset), use_cpu=True, report_to="none", disable_tqdm=True,
                       dataloader_pin_memory=False)
    trainer = DPOTrainerFromShards(model=policy, args=config, train_dataset=dataset,
                                   processing_class=load_tokenizer(plain["model"]))
    assert trainer.ref_model is None  # no reference model was created
    train = trainer.train_dataset
    assert train["ref_chosen_logps"] == dataset["ref_chosen_logps"]  # TRL kept the shards' sums
    policy.train()
    batch = trainer.data_collator([train[i] for i in range(len(train))])  # in order: no shuffling
    loss = trainer.compute_loss(policy, trainer._prepare_inputs(batch))
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in policy.named_parameters()}


def test_trl_dpo_trainer_equals_wspo_dpo(plain, tmp_path):
    dataset = plain["shards"].to_trl_dpo(max_length=None)
    assert dataset.column_names == ["example_id", "prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"]
    assert dataset[0]["chosen"][0]["role"] == "assistant" and dataset[0]["prompt"][-1]["role"] == "user"
    # The sums are the shards' per-token reference log-probs added up.
    table = plain["shards"].read_table(columns=["example_id", "slot", "logp_ref"])
    by_key = {(e, s): sum(lp) for e, s, lp in zip(*(table[c].to_pylist() for c in ("example_id", "slot", "logp_ref")))}
    assert dataset["ref_chosen_logps"] == pytest.approx([by_key[(e, "chosen")] for e in dataset["example_id"]], abs=1e-4)

    wspo_loss, wspo_grads, n_pairs = wspo_loss_and_grads(plain, tmp_path)
    trl_loss, trl_grads = trl_loss_and_grads(plain, dataset, tmp_path)
    print(f"pairs {n_pairs}: wspo {wspo_loss:.9f}, trl {trl_loss:.9f}, |diff| {abs(wspo_loss - trl_loss):.2e}")
    assert n_pairs == dataset.num_rows >= 4
    assert abs(wspo_loss - math.log(2)) > 1e-3  # policy != reference: the loss is off log 2
    assert abs(wspo_loss - trl_loss) < 1e-5
    assert wspo_grads.keys() == trl_grads.keys()
    for name, grad in wspo_grads.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(trl_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert float((trl_grads[name] - grad).norm() / grad.norm()) < 1e-5, name


def test_export_refuses_other_tokens(tiny_models, plain, tmp_path, capsys):
    from wspo.shards.cli import main

    # ChatML writes a newline after <|im_end|>: TRL's completion has one token the shards never scored.
    chatml = dpo_shards(tmp_path / "chatml", tiny_models["weak_ref"], 2)
    with pytest.raises(ShardError, match=r"TRL 1\.16\.0 would score other tokens than the shards did.*1 token\(s\) "
                                         r"after the end-of-turn token that the shards did not score \('\\n'"):
        chatml.to_trl_dpo()
    assert main(["export", "--format", "trl-dpo", str(chatml.root), str(tmp_path / "refused")]) == 1
    assert "Refusing the export" in capsys.readouterr().err and not (tmp_path / "refused").exists()

    # A sequence longer than the max_length TRL will run with would be cut by TRL's collator.
    with pytest.raises(ShardError, match=r"more than TRL's max_length 40, which would cut it"):
        plain["shards"].to_trl_dpo(max_length=40)
    # Without logp_ref there is no reference sum to hand over.
    with pytest.raises(ShardError, match="no logp_ref column"):
        dpo_shards_without_ref = ShardSet.open(tiny_models_shards(tiny_models, tmp_path))
        dpo_shards_without_ref.to_trl_dpo()


def tiny_models_shards(tiny_models, tmp_path) -> Path:
    from wspo.precompute.cli import main

    out = tmp_path / "wspo_shards"
    assert main(["--dataset", "embedded", "--output_dir", str(out), "--max_samples", "2", "--weak_ref",
                 str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]), "--max_length", "256",
                 "--disable_tqdm", "true"]) == 0
    return out


def test_cli_export_writes_a_dataset_folder(plain, tmp_path, capsys):
    from datasets import load_dataset

    from wspo.shards.cli import main

    out = tmp_path / "export"
    assert main(["export", "--format", "trl-dpo", "--max_length", "none", str(plain["shards"].root), str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    loaded = load_dataset(str(out), split="train")
    expected = plain["shards"].to_trl_dpo(max_length=None)
    assert loaded.to_list() == expected.to_list()
