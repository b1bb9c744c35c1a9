"""`wspo-train --loss dpo` and `--loss wrpo` with the reference's log-probs from the shards
(`logp_ref`, scored in phase one by `wspo-precompute --ref_model`).

- each loss, computed by the trainer from shard batches, equals a slow direct computation written
  here (policy and reference models loaded, full forward, log_softmax, gather, sum, formula) to
  1e-5 in fp32, and so do the gradients;
- WRPO's alpha follows the optimizer step under gradient accumulation (first, middle, last step);
- DPO end to end on the bundled sample trains the tiny weak SFT model: the loss falls and the
  implicit-reward accuracy on the training pairs rises above 0.5;
- bad input gives clear errors.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_helpers import SHARD_MAX_LENGTH, SHARD_MAX_PROMPT_LENGTH, TRAIN_MAX_LENGTH, train_argv, train_setup  # noqa: F401

from wspo.train.cli import main as train_main
from wspo.train.losses import dpo_loss, wrpo_alpha, wrpo_loss

BATCH = 4
SLOTS = {"dpo": ("chosen", "rejected"), "wrpo": ("chosen_source", "chosen_target", "rejected")}


# -- phase one ----------------------------------------------------------------------------------


def precompute_ref(out: Path, ref_model: Path, slots: str, samples: int, dataset: str = "embedded") -> Path:
    from wspo.precompute.cli import main

    argv = ["--dataset", dataset, "--output_dir", str(out), "--max_samples", str(samples), "--slots", slots,
            "--ref_model", str(ref_model), "--max_length", str(SHARD_MAX_LENGTH),
            "--max_prompt_length", str(SHARD_MAX_PROMPT_LENGTH), "--backend", "hf", "--dtype", "float32",
            "--batch_tokens", "4096"]
    if dataset != "embedded":
        argv += ["--dataset_split", "train"]
    assert main(argv) == 0
    return out


def wrpo_dataset(path: Path, n: int) -> Path:
    """The WRPO release layout from the bundled sample: chosen = [y_ws, y_wt], rejected = [y_l];
    y_ws the sample's chosen response, y_wt its first half (a different text), y_l the rejected."""
    from wspo.embedded.sample import SAMPLE_DIR

    rows = []
    with open(SAMPLE_DIR / "train_prefs.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            source = row["chosen"]
            words = source[-1]["content"].split(" ")
            target = source[:-1] + [{"role": "assistant", "content": " ".join(words[: max(1, len(words) // 2)])}]
            rows.append({"prompt": row["prompt"], "prompt_id": row["prompt_id"], "chosen": [source, target],
                         "rejected": [row["rejected"]]})
            if len(rows) == n:
                break
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def dpo_shards(train_setup, tmp_path_factory):  # noqa: F811
    """chosen + rejected of 16 sample rows, reference = the strong SFT model."""
    return precompute_ref(tmp_path_factory.mktemp("dpo_strong") / "shards", train_setup["strong_sft"], "chosen,rejected", 16)


@pytest.fixture(scope="module")
def wrpo_shards(train_setup, tmp_path_factory):  # noqa: F811
    """chosen_source, chosen_target, rejected of 12 WRPO rows, reference = the strong SFT model."""
    root = tmp_path_factory.mktemp("wrpo_strong")
    data = wrpo_dataset(root / "wrpo.jsonl", 12)
    return precompute_ref(root / "shards", train_setup["strong_sft"], "chosen_source,chosen_target,rejected", 12, str(data))


def run_cli(capsys, argv):
    rc = train_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# -- the loss functions on their own ------------------------------------------------------------


def test_losses_by_hand():
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([-10.0, -20.0], [-12.0, -19.0], [-11.0, -20.5], [-11.5, -18.0]))
    beta = 0.1
    margins = [(-10 + 11) - (-12 + 11.5), (-20 + 20.5) - (-19 + 18)]  # 1.5, -0.5
    expected = sum(-math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 2
    assert abs(dpo_loss(pc, pr, rc, rr, beta).item() - expected) < 1e-12
    # WRPO with alpha = 0 is DPO on (y_wt, y_l); with alpha = 1 DPO on (y_ws, y_l).
    ps = torch.tensor([-9.0, -25.0], dtype=torch.float64)
    rs = torch.tensor([-9.5, -24.0], dtype=torch.float64)
    assert torch.allclose(wrpo_loss(ps, pc, pr, rs, rc, rr, beta, 0.0), dpo_loss(pc, pr, rc, rr, beta))
    assert torch.allclose(wrpo_loss(ps, pc, pr, rs, rc, rr, beta, 1.0), dpo_loss(ps, pr, rs, rr, beta))
    alpha = 0.3
    mixed = [0.3 * 0.5 + 0.7 * 1.0 - (-12 + 11.5), 0.3 * -1.0 + 0.7 * 0.5 - (-19 + 18)]
    expected = sum(math.log(1 + math.exp(-0.01 * m)) for m in mixed) / 2
    assert abs(wrpo_loss(ps, pc, pr, rs, rc, rr, 0.01, alpha).item() - expected) < 1e-12


def test_alpha_schedule_values():
    assert [wrpo_alpha(s, 5, 0.1) for s in range(5)] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])
    assert wrpo_alpha(5, 5, 0.1) == pytest.approx(0.1)  # evaluation after the last step
    assert wrpo_alpha(0, 1, 0.1) == 0.0  # a one-step run trains at alpha 0, as the authors' code does
    assert wrpo_alpha(3, 5, 0.2, "fixed") == 0.2


def test_beta_default_depends_on_loss():
    from wspo.train.config import WSPOArguments

    def args(**kw):
        return WSPOArguments(model_name_or_path="m", shards=["s"], **kw)

    assert args(loss="dpo").beta == 0.1 and args(loss="wrpo").beta == 0.01 and args(loss="wrpo", beta=0.05).beta == 0.05
    assert args(loss="dpo").reference_logps == "shards" and args().reference_logps == "model"
    with pytest.raises(ValueError, match="reference_logps model is not supported"):
        args(loss="dpo", reference_logps="model")
    with pytest.raises(ValueError, match="wrpo_alpha_schedule"):
        args(loss="wrpo", wrpo_alpha_schedule="cosine")


# -- trainer vs. the direct computation ---------------------------------------------------------


def direct_logp_sum(model, tokenizer, messages: list[dict], response: str) -> torch.Tensor:
    """sum_t log p(y_t | x, y_<t) over the response tokens (cut at TRAIN_MAX_LENGTH), float64,
    from a full forward of one sequence."""
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = (prompt + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:TRAIN_MAX_LENGTH]
    logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(logps[t - 1, ids[t]].double() for t in range(len(prompt), len(ids)))


def direct_loss(loss: str, groups: list[list[dict]], tokenizer, reference, policy, beta: float, alpha: float) -> torch.Tensor:
    """DPO / WRPO written out, one example at a time: D = log pi(y) - log ref(y) per response."""
    terms = []
    for rows in groups:
        d = []
        for row in rows:
            messages = json.loads(row["messages"])
            with torch.no_grad():
                ref = direct_logp_sum(reference, tokenizer, messages, row["response"])
            d.append(direct_logp_sum(policy, tokenizer, messages, row["response"]) - ref)
        if loss == "dpo":
            z = beta * (d[0] - d[1])
        else:
            z = beta * (alpha * d[0] + (1 - alpha) * d[1] - d[2])
        terms.append(-torch.nn.functional.logsigmoid(z))
    return sum(terms) / len(terms)


def preference_examples(setup, paths: list[str], loss: str, cache_dir: Path):
    """Every example of the shard sets (drawn from the Arrow-backed dataset), its counts, the rule."""
    from wspo.models import load_tokenizer
    from wspo.train.shard_sets import open_shard_sets, reference_sets, strong_rule
    from wspo.train.pairs import pair_datasets

    sets = open_shard_sets(paths, loss)
    rule, _ = strong_rule(sets, load_tokenizer(setup["strong_sft"]), TRAIN_MAX_LENGTH, "none")
    counts = Counter()
    ref_sets = reference_sets(paths, sets, setup["strong_sft"], rule, "ref")
    dataset, _, _ = pair_datasets(sets, rule, loss, ref_sets, 0.0, cache_dir, counts)
    return [dataset[i] for i in range(len(dataset))], counts, rule


def preference_batch(setup, shards: Path, loss: str, cache_dir: Path):
    from wspo.shards.store import ShardSet
    from wspo.train.pairs import PreferenceCollator

    examples, counts, rule = preference_examples(setup, [str(shards)], loss, cache_dir)
    tokenizer = rule.tokenizer
    chosen = examples[:BATCH]
    by_id = {r["id"]: r for r in ShardSet.open(shards).read_table(columns=["id", "slot", "messages", "response"]).to_pylist()}
    groups = [[by_id[r.row_id] for r in e.responses] for e in chosen]
    assert all([row["slot"] for row in g] == list(SLOTS[loss]) for g in groups)
    return PreferenceCollator(tokenizer.pad_token_id)(chosen), groups, tokenizer, examples, counts


@pytest.mark.parametrize("loss", ["dpo", "wrpo"])
def test_trainer_loss_equals_direct_computation(train_setup, dpo_shards, wrpo_shards, tmp_path, loss):  # noqa: F811
    from transformers import AutoModelForCausalLM, TrainingArguments

    from wspo.embedded.models import perturb_model
    from wspo.train.trainer import WSPOTrainer

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    shards = dpo_shards if loss == "dpo" else wrpo_shards
    batch, groups, tokenizer, examples, counts = preference_batch(train_setup, shards, loss, tmp_path / "cache")
    k = len(SLOTS[loss])
    assert batch["input_ids"].shape[0] == BATCH * k and len(batch["ref_logps"]) == int(batch["target_mask"].sum())
    assert counts["examples_complete"] == len(examples) > BATCH
    beta, alpha_max = 0.5, 0.3
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True)
    # Policy != reference, as after some training: a perturbed copy of the strong SFT model.
    perturb_model(train_setup["strong_sft"], tmp_path / "policy", scale=0.02, seed=3)
    policy = load(tmp_path / "policy")
    trainer = WSPOTrainer(policy, args, loss=loss, beta=beta, wrpo_alpha=alpha_max, reference_from_shards=True,
                          train_dataset=examples)
    # WRPO mid-run: optimizer step 2 of 5 -> alpha = 0.3 * 2 / 5.
    trainer.state.global_step, trainer.state.max_steps = 2, 5
    alpha = 0.12
    assert trainer.current_wrpo_alpha() == pytest.approx(alpha)
    policy.train()

    policy.zero_grad(set_to_none=True)
    got = trainer.compute_loss(policy, trainer._prepare_inputs(batch))
    got.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    direct = direct_loss(loss, groups, tokenizer, load(train_setup["strong_sft"]), policy, beta, alpha)
    direct.backward()
    print(f"{loss}: trainer {got.item():.9f}, direct {direct.item():.9f}, |diff| {abs(got.item() - direct.item()):.2e}")
    assert got.dtype == torch.float32
    assert abs(got.item() - math.log(2)) > 1e-3  # the perturbation moved the loss off log 2
    assert abs(got.item() - direct.item()) < 1e-5, (got.item(), direct.item())
    for name, p in policy.named_parameters():
        # Summed (not averaged) log-probs make these gradients ~100x the per-token losses': fp32
        # rounding of the two batchings is compared to each tensor's scale.
        scale = float(p.grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert float((grads[name] - p.grad).norm() / p.grad.norm()) < 1e-5, name


# -- WRPO's alpha under gradient accumulation ---------------------------------------------------


def test_wrpo_alpha_follows_optimizer_steps(train_setup, wrpo_shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    """max_steps 5, gradient_accumulation_steps 2: both micro-batches of step s use
    alpha = 0.1 * s / 5 (the WRPO authors' schedule), so 0 at the first step, 0.04 at the middle
    one, 0.08 at the last: alpha_max is never reached during training."""
    import wspo.train.losses as losses

    used, original = [], losses.wrpo_losses

    def recording(*args):
        used.append(args[-1])
        return original(*args)

    monkeypatch.setattr(losses, "wrpo_losses", recording)
    out = tmp_path / "wrpo"
    rc, err = run_cli(capsys, train_argv(train_setup, out, shards=wrpo_shards, loss="wrpo", max_steps=5,
                                         gradient_accumulation_steps=2, per_device_train_batch_size=2, learning_rate=1e-4))
    assert rc == 0, err
    per_step = [0.0, 0.02, 0.04, 0.06, 0.08]
    assert used == pytest.approx([a for a in per_step for _ in range(2)])
    assert used == pytest.approx([0, 0, .02, .02, .04, .04, .06, .06, .08, .08])
    assert max(used) < 0.1
    record = json.loads((out / "wspo_run.json").read_text())
    logs = [h for h in record["log_history"] if "loss" in h]
    assert [h["wrpo_alpha"] for h in logs] == pytest.approx(per_step)  # step s logs the alpha it used
    for key in ("rewards/chosen", "rewards/chosen_source", "rewards/chosen_target", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen_source", "logps/rejected"):
        assert all(key in h for h in logs), key
    assert record["model"]["reference"] == "logp_ref from shards"
    assert record["preference"]["beta"] == 0.01 and record["preference"]["reference"]["same_weights_as_model"] is True
    assert record["data"]["rows_chosen_source"] == record["data"]["rows_rejected"] == 12


# -- DPO end to end: the weak SFT model becomes a weak aligned model -------------------------------


def test_dpo_trains_the_weak_model(train_setup, tmp_path, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from wspo.models import load_tokenizer

    weak = train_setup["weak_ref"]
    shards = precompute_ref(tmp_path / "shards", weak, "chosen,rejected", 48)
    out = tmp_path / "weak_dpo"
    rc, err = run_cli(capsys, train_argv(train_setup, out, model_name_or_path=weak, shards=shards, loss="dpo",
                                         max_steps=24, per_device_train_batch_size=8, learning_rate=1e-3))
    assert rc == 0, err
    record = json.loads((out / "wspo_run.json").read_text())
    logs = [h for h in record["log_history"] if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    last_epoch = logs[-6:]  # 48 pairs / 8 per step
    assert sum(h["loss"] for h in last_epoch) / 6 < 0.8 * math.log(2)
    assert sum(h["rewards/accuracies"] for h in last_epoch) / 6 > 0.5
    assert record["data"]["train_rows"] == 48 and record["preference"]["beta"] == 0.1

    # The saved model, measured directly on every training pair against the loaded reference.
    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    from wspo.shards.store import ShardSet

    tokenizer, policy, reference = load_tokenizer(weak), load(out), load(weak)
    rows = ShardSet.open(shards).read_table(columns=["example_id", "slot", "messages", "response"]).to_pylist()
    pairs = {}
    for row in rows:
        pairs.setdefault(row["example_id"], {})[row["slot"]] = row
    margins = []
    with torch.no_grad():
        for pair in pairs.values():
            d = [direct_logp_sum(policy, tokenizer, json.loads(pair[s]["messages"]), pair[s]["response"])
                 - direct_logp_sum(reference, tokenizer, json.loads(pair[s]["messages"]), pair[s]["response"])
                 for s in ("chosen", "rejected")]
            margins.append(float(d[0] - d[1]))
    accuracy = sum(m > 0 for m in margins) / len(margins)
    loss = sum(math.log1p(math.exp(-0.1 * m)) for m in margins) / len(margins)
    print(f"DPO end-to-end: train accuracy {accuracy:.3f}, train loss {loss:.4f} (start {math.log(2):.4f}); "
          f"logged loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f}")
    assert len(margins) == 48 and accuracy > 0.5 and loss < math.log(2)


# -- bad input ----------------------------------------------------------------------------------


def test_preference_input_errors(train_setup, dpo_shards, tmp_path, capsys):  # noqa: F811
    def error(argv):
        rc, err = run_cli(capsys, argv)
        assert rc == 1 and "Traceback" not in err, err
        return err

    # WSPO shards: no logp_ref column.
    err = error(train_argv(train_setup, tmp_path / "out", loss="dpo"))
    assert "no logp_ref column" in err and "--ref_model" in err

    # logp_ref, but chosen rows only: no pair is complete.
    chosen_only = precompute_ref(tmp_path / "chosen_only", train_setup["strong_sft"], "chosen", 8)
    err = error(train_argv(train_setup, tmp_path / "out", loss="dpo", shards=chosen_only))
    assert "no example" in err and "rows by slot: {'chosen': 8}" in err and "skipped_missing_rejected" in err
    assert "--slots chosen,rejected" in err

    # DPO shards for WRPO: no chosen_source rows.
    err = error(train_argv(train_setup, tmp_path / "out", loss="wrpo", shards=dpo_shards))
    assert "chosen_source, chosen_target, rejected" in err and "--slots chosen_source,chosen_target,rejected" in err

    # A reference other than the model being trained: an error, unless allowed (and recorded).
    err = error(train_argv(train_setup, tmp_path / "out", loss="dpo", shards=dpo_shards,
                           model_name_or_path=train_setup["weak_ref"]))
    assert "whose weights differ from model_name_or_path" in err and "--allow_reference_mismatch" in err
    rc, err = run_cli(capsys, train_argv(train_setup, tmp_path / "other_ref", loss="dpo", shards=dpo_shards, max_steps=1,
                                         model_name_or_path=train_setup["weak_ref"], allow_reference_mismatch="true"))
    assert rc == 0, err
    record = json.loads((tmp_path / "other_ref" / "wspo_run.json").read_text())
    assert record["preference"]["reference"] == {
        "column": "logp_ref", "same_weights_as_model": False, "checked": False,
        "scorers": [{"model": record["reference_shards"][0]["scorers"][0]["model"],
                     "fingerprint": record["reference_shards"][0]["scorers"][0]["fingerprint"]}],
    }

    err = error(train_argv(train_setup, tmp_path / "out", loss="dpo", reference_logps="model"))
    assert "reference_logps model is not supported" in err


def test_preference_recipes_parse():
    from transformers import TrainingArguments

    from wspo.args import parse_config
    from wspo.train.config import WSPOArguments

    configs = Path(__file__).parents[1] / "configs"
    argv = ["--bf16", "false", "--use_cpu", "true"]
    wrpo, training = parse_config([WSPOArguments, TrainingArguments], [str(configs / "train_wrpo.yaml"), *argv])
    assert (wrpo.loss, wrpo.beta, wrpo.wrpo_alpha, wrpo.wrpo_alpha_schedule, wrpo.reference_logps) == ("wrpo", 0.01, 0.1, "linear", "shards")
    assert (training.learning_rate, training.num_train_epochs, training.lr_scheduler_type.value, training.warmup_steps) == (3e-7, 1, "cosine", 0.1)
    assert training.deepspeed.endswith("deepspeed_zero3.json")
    dpo, training = parse_config([WSPOArguments, TrainingArguments], [str(configs / "train_dpo_weak.yaml"), *argv])
    assert (dpo.loss, dpo.beta, training.learning_rate) == ("dpo", 0.1, 5e-7)


def test_examples_missing_a_side_are_skipped_and_counted(train_setup, tmp_path):  # noqa: F811
    """Two shard sets: chosen rows of 8 examples, rejected rows of the first 4: 4 pairs, 4 counted."""
    chosen = precompute_ref(tmp_path / "chosen", train_setup["strong_sft"], "chosen", 8)
    rejected = precompute_ref(tmp_path / "rejected", train_setup["strong_sft"], "rejected", 4)
    examples, counts, _ = preference_examples(train_setup, [str(chosen), str(rejected)], "dpo", tmp_path / "cache")
    assert len(examples) == 4 and counts["skipped_missing_rejected"] == 4 and counts["unpaired_rows"] == 4
    assert counts["rows_chosen"] == 8 and counts["rows_rejected"] == 4
    for e in examples:
        assert [len(r.ref_logps) for r in e.responses] == [len(r.input_ids) - r.prompt_length for r in e.responses]


def test_grouping_pairs_rows_in_reading_order():
    """group_examples: one tuple per complete set of slots, in slot order; several rows of a slot
    pair in reading order; incomplete examples and leftover rows are counted."""
    import pyarrow as pa

    from wspo.train.pairs import group_examples

    #            0    1    2    3    4    5    6    7    8
    examples = ["a", "b", "a", "c", "a", "b", "a", "d", "d"]
    slots = ["rejected", "chosen", "chosen", "chosen", "chosen", "rejected", "rejected", "rejected", "rejected"]
    table = pa.table({"example_id": examples, "slot": pa.array(slots).dictionary_encode()})
    counts = Counter()
    tuples = group_examples(table, ("chosen", "rejected"), counts)
    # a: chosen 2, 4 / rejected 0, 6 -> (2, 0), (4, 6); b: (1, 5); c: no rejected; d: no chosen.
    assert tuples.tolist() == [[2, 0], [4, 6], [1, 5]]
    assert counts == {"skipped_missing_chosen": 1, "skipped_missing_rejected": 1, "unpaired_rows": 3}
    counts = Counter()
    assert group_examples(table.slice(0, 0), ("chosen", "rejected"), counts).shape == (0, 2)


def test_pairs_stay_in_arrow(train_setup, dpo_shards, tmp_path):  # noqa: F811
    """The datasets hold row positions (a few integers per tuple), pickle without row data, and
    the held-out side is chosen by example_id like the WSPO rows."""
    import pickle

    from wspo.models import load_tokenizer
    from wspo.shards.store import ShardSet
    from wspo.train.examples import is_eval_example
    from wspo.train.shard_sets import open_shard_sets, reference_sets, strong_rule
    from wspo.train.pairs import pair_datasets

    sets = open_shard_sets([str(dpo_shards)], "dpo")
    rule, _ = strong_rule(sets, load_tokenizer(train_setup["strong_sft"]), TRAIN_MAX_LENGTH, "none")
    ref_sets = reference_sets([str(dpo_shards)], sets, train_setup["strong_sft"], rule, "ref")
    train, held_out, n = pair_datasets(sets, rule, "dpo", ref_sets, 0.3, tmp_path / "cache", Counter())
    assert len(train) + len(held_out) == n and len(held_out) > 0 and train.tuples.dtype == np.int64
    # Pickled (a data loader worker) as cache paths, positions and the rule: no row text.
    pickled = pickle.dumps(train)
    texts = ShardSet.open(dpo_shards).read_table(columns=["response"])["response"].to_pylist()
    assert not any(t.encode() in pickled for t in texts if len(t) > 20)
    for side, held in ((train, False), (held_out, True)):
        drawn = [side[i] for i in range(len(side))]
        assert all(is_eval_example(e.example_id, 0.3) == held for e in drawn)
        assert [e.index for e in drawn] == list(range(len(side)))  # no tuple skipped here
    again = pickle.loads(pickle.dumps(held_out))[0]
    first = held_out[0]
    assert [r.input_ids for r in again.responses] == [r.input_ids for r in first.responses]
    assert all(np.array_equal(a.ref_logps, b.ref_logps) for a, b in zip(again.responses, first.responses))


def test_reference_logps_keep_float32_when_inputs_are_cast(train_setup, dpo_shards, tmp_path, monkeypatch):  # noqa: F811
    """Under DeepSpeed the stock Trainer casts every float input to the engine dtype (bf16); the
    summed reference must not be rounded that way."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from wspo.train.trainer import WSPOTrainer

    original = Trainer._prepare_input

    def cast_like_deepspeed(self, data):
        data = original(self, data)
        return data.to(torch.bfloat16) if isinstance(data, torch.Tensor) and data.is_floating_point() else data

    monkeypatch.setattr(Trainer, "_prepare_input", cast_like_deepspeed)
    batch, *_ = preference_batch(train_setup, dpo_shards, "dpo", tmp_path / "cache")
    policy = AutoModelForCausalLM.from_pretrained(str(train_setup["strong_sft"]), dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = WSPOTrainer(policy, args, loss="dpo", reference_from_shards=True, train_dataset=[0])
    prepared = trainer._prepare_inputs(batch)
    assert prepared["ref_logps"].dtype == torch.float32 and torch.equal(prepared["ref_logps"], batch["ref_logps"])


# -- memory: gradient checkpointing ---------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_trains_the_same_steps(train_setup, dpo_shards, tmp_path, capsys, lora):  # noqa: F811
    """`--gradient_checkpointing true` (TRL's DPOConfig default; at vs_trl.py's 26M shape it takes
    ~350 MiB off wspo-train's peak RSS, docs/benchmarks.md) recomputes each layer's activations in
    the backward pass. The response log-probs come from a hook on the decoder (wspo.logprobs), which
    the recomputation must not disturb: every step's loss and gradient norm, and the trained
    weights, equal a run without it."""
    from safetensors.torch import load_file

    logs, weights = {}, {}
    for checkpointing in ("false", "true"):
        out = tmp_path / f"checkpointing-{checkpointing}"
        keys = dict(shards=dpo_shards, loss="dpo", max_steps=3, gradient_checkpointing=checkpointing)
        rc, err = run_cli(capsys, train_argv(train_setup, out, **keys, **({"use_lora": "true"} if lora else {})))
        assert rc == 0, err
        history = json.loads((out / "wspo_run.json").read_text())["log_history"]
        logs[checkpointing] = [(h["loss"], h["grad_norm"]) for h in history if "loss" in h]
        weights[checkpointing] = load_file(out / ("adapter_model.safetensors" if lora else "model.safetensors"))
    assert len(logs["true"]) == 3 and logs["true"][-1][0] < logs["true"][0][0]  # it trained
    assert np.allclose(logs["true"], logs["false"], rtol=0, atol=1e-6), (logs["true"], logs["false"])
    assert weights["true"].keys() == weights["false"].keys()
    for name, tensor in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], tensor, rtol=0, atol=1e-6)
