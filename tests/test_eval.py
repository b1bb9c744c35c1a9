"""`wspo-eval`: implicit rewards against a direct computation, shards against the dataset,
completions against a direct `generate`, vLLM against hf, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wspo.embedded.models import perturb_model
from wspo.embedded.sample import SAMPLE_DIR
from wspo.evaluation.cli import main as eval_main
from wspo.precompute.cli import main as precompute_main
from wspo.shards.tokenization import ResponseTokenizer

N_PAIRS = 8


@pytest.fixture(scope="module")
def policy(tiny_models, tmp_path_factory):
    """A tiny policy: the weak reference with seeded noise."""
    out = tmp_path_factory.mktemp("policy") / "policy"
    perturb_model(tiny_models["weak_ref"], out, scale=0.05, seed=7)
    return out


@pytest.fixture(scope="module")
def chatty(tiny_models, tmp_path_factory):
    """A model whose greedy continuations vary (the unperturbed tiny model repeats one token)."""
    out = tmp_path_factory.mktemp("chatty") / "chatty"
    perturb_model(tiny_models["weak_ref"], out, scale=0.2, seed=3)
    return out


def _test_rows(n: int) -> list[dict]:
    with open(SAMPLE_DIR / "test_prefs.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def _run(argv: list[str], capsys) -> dict:
    assert eval_main(argv) == 0
    out = capsys.readouterr().out
    # The summary is the last thing printed (vLLM, when imported earlier in this process, may log to stdout).
    start = 0 if out.startswith("{\n") else out.rindex("\n{\n") + 1
    return json.loads(out[start:])


def _rewards(policy_dir, reference_dir, capsys, tmp_path, *extra) -> tuple[dict, list[dict]]:
    pairs_file = tmp_path / f"pairs-{len(list(tmp_path.iterdir()))}.jsonl"
    summary = _run(["rewards", "--policy", str(policy_dir), *(["--reference", str(reference_dir)] if reference_dir else []),
                    "--max_samples", str(N_PAIRS), "--pairs_file", str(pairs_file), *extra], capsys)
    return summary, [json.loads(line) for line in pairs_file.read_text().splitlines()]


def _direct_logp_sum(model, tokenizer, messages: list[dict], response: str) -> float:
    """Full forward, full-vocabulary log_softmax, gather, sum over the response tokens."""
    rule = ResponseTokenizer(tokenizer, 4096, 2048)
    tok = rule(messages, response)
    ids = torch.tensor([tok.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    p = len(tok.prompt_ids)
    return float(logp[p - 1 : -1].gather(1, ids[0, p:, None]).sum())


def test_rewards_match_a_direct_computation(tiny_models, policy, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_file = tmp_path / "summary.json"
    summary, pairs = _rewards(policy, tiny_models["weak_ref"], capsys, tmp_path, "--dataset", "embedded",
                              "--dataset_split", "test_prefs", "--output_file", str(out_file), "--beta", "0.1")
    assert json.loads(out_file.read_text()) == summary
    assert summary["pairs"] == N_PAIRS and summary["skipped"] == {}

    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    pi = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_models["weak_ref"]), dtype=torch.float32).eval()
    expected = []
    for row in _test_rows(N_PAIRS):
        rewards = []
        for side in ("chosen", "rejected"):
            messages, response = row[side][:-1], row[side][-1]["content"]
            rewards.append(_direct_logp_sum(pi, tokenizer, messages, response) - _direct_logp_sum(ref, tokenizer, messages, response))
        expected.append(rewards)
    expected = np.array(expected)
    got = np.array([[p["chosen_reward"], p["rejected_reward"]] for p in pairs])
    assert [p["example_id"] for p in pairs] == [r["prompt_id"] for r in _test_rows(N_PAIRS)]
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got).max() > 0.1  # the policy really differs from the reference

    # The summary's figures are exactly those of its per-pair rewards (ties are not wins).
    margin = got[:, 0] - got[:, 1]
    assert summary["accuracy"] == np.mean(margin > 0) == np.mean(expected[:, 0] - expected[:, 1] > 0)
    assert 0 < summary["accuracy"] < 1
    assert summary["margin_mean"] == pytest.approx(margin.mean(), abs=1e-9)
    assert summary["margin_mean"] == pytest.approx((expected[:, 0] - expected[:, 1]).mean(), abs=1e-4)
    assert summary["chosen_reward_mean"] == pytest.approx(got[:, 0].mean(), abs=1e-9)
    assert summary["rejected_reward_mean"] == pytest.approx(got[:, 1].mean(), abs=1e-9)
    per_token = got / np.array([[p["chosen_tokens"], p["rejected_tokens"]] for p in pairs])
    assert summary["per_token"]["accuracy"] == np.mean(per_token[:, 0] > per_token[:, 1])
    assert summary["per_token"]["margin_mean"] == pytest.approx((per_token[:, 0] - per_token[:, 1]).mean(), abs=1e-9)
    assert summary["scaled"]["margin_mean"] == pytest.approx(0.1 * margin.mean(), abs=1e-9)
    # Held-out NLL per token of the chosen responses, under each model, from direct log-prob sums.
    chosen_tokens = sum(p["chosen_tokens"] for p in pairs)
    for key, model in (("policy_nll_per_token", pi), ("reference_nll_per_token", ref)):
        direct = -sum(_direct_logp_sum(model, tokenizer, row["chosen"][:-1], row["chosen"][-1]["content"])
                      for row in _test_rows(N_PAIRS)) / chosen_tokens
        assert summary[key] == pytest.approx(direct, rel=1e-5) and summary[key] > 0
    assert summary["policy_nll_per_token"] != summary["reference_nll_per_token"]


def test_policy_equal_to_reference_scores_zero(tiny_models, capsys, tmp_path):
    """Rewards are exactly 0; a tie is not a win, so accuracy is 0 and every pair is a tie."""
    summary, pairs = _rewards(tiny_models["weak_ref"], tiny_models["weak_ref"], capsys, tmp_path, "--dataset", "embedded")
    assert all(p["chosen_reward"] == 0.0 and p["rejected_reward"] == 0.0 for p in pairs)
    assert summary["accuracy"] == 0.0 and summary["ties"] == N_PAIRS and summary["margin_mean"] == 0.0


def test_shards_give_the_dataset_numbers(tiny_models, capsys, tmp_path):
    """Shards with chosen and rejected rows, paired by example_id, give the dataset's numbers,
    with the reference as a model or as the shards' logp_weak_ref column."""
    shards = tmp_path / "shards"
    assert precompute_main(["--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]),
                            "--dataset_split", "test_prefs", "--max_samples", str(N_PAIRS), "--slots", "chosen,rejected",
                            "--max_length", "1024", "--max_prompt_length", "512", "--output_dir", str(shards)]) == 0
    capsys.readouterr()
    policy, ref = tiny_models["weak_aligned"], tiny_models["weak_ref"]
    from_data, data_pairs = _rewards(policy, ref, capsys, tmp_path, "--dataset", "embedded")
    from_shards, shard_pairs = _rewards(policy, ref, capsys, tmp_path, "--shards", str(shards))
    from_column, column_pairs = _rewards(policy, None, capsys, tmp_path, "--shards", str(shards), "--reference_column", "weak_ref")
    assert from_shards["source"]["token_ids"] == "stored" and from_column["reference"]["column"] == "logp_weak_ref"
    assert data_pairs == shard_pairs  # same sequences, same batches: identical numbers
    for a, b in zip(data_pairs, column_pairs):
        assert a["example_id"] == b["example_id"] and a["chosen_tokens"] == b["chosen_tokens"]
        assert abs(a["chosen_reward"] - b["chosen_reward"]) < 1e-4 and abs(a["rejected_reward"] - b["rejected_reward"]) < 1e-4
    for key in ("pairs", "accuracy", "response_tokens"):
        assert from_data[key] == from_shards[key] == from_column[key]
    assert from_data["margin_mean"] == pytest.approx(from_column["margin_mean"], abs=1e-4)


def _direct_generate(model_dir, conversations: list[list[dict]], max_new_tokens: int, eos_id: int | None = None,
                     ids_out: list | None = None) -> list[str]:
    """One prompt at a time, no padding: chat template + generation prompt, greedy, cut at end-of-turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    outputs = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1] :].tolist()
        if ids_out is not None:
            ids_out.append(new)
        outputs.append(tokenizer.decode(new[: new.index(eos_id)] if eos_id in new else new, skip_special_tokens=True))
    return outputs


def test_generate_hf_matches_direct_generate(chatty, capsys, tmp_path):
    rows = _test_rows(2)  # the second is multi-turn: its instruction is the last user message
    out = tmp_path / "outputs.json"
    summary = _run(["generate", "--model", str(chatty), "--dataset", "embedded", "--max_samples", "2",
                    "--max_new_tokens", "12", "--generator", "tiny-chatty", "--output_file", str(out)], capsys)
    records = json.loads(out.read_text())
    assert [list(r) for r in records] == [["instruction", "output", "generator", "dataset"]] * 2
    assert [r["instruction"] for r in records] == [[m for m in row["chosen"] if m["role"] == "user"][-1]["content"] for row in rows]
    assert {r["generator"] for r in records} == {"tiny-chatty"} and {r["dataset"] for r in records} == {"embedded"}
    generated: list[list[int]] = []
    expected = _direct_generate(chatty, [row["chosen"][:-1] for row in rows], 12, ids_out=generated)
    assert [r["output"] for r in records] == expected
    assert len(set(expected)) == 2 and all(len(e) > 5 for e in expected)
    assert summary["outputs"] == 2 and summary["preference_signal_share"] == 0.0 and summary["hit_max_new_tokens"] == 2

    # Generation stops at the end-of-turn token: make it a token the model emits mid-answer.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chatty))
    stop_id = generated[0][4]
    summary = _run(["generate", "--model", str(chatty), "--dataset", "embedded", "--max_samples", "2", "--max_new_tokens", "12",
                    "--end_of_turn_token", tokenizer.convert_ids_to_tokens(stop_id), "--output_file", str(out)], capsys)
    stopped = [r["output"] for r in json.loads(out.read_text())]
    assert stopped == _direct_generate(chatty, [row["chosen"][:-1] for row in rows], 12, eos_id=stop_id)
    assert len(stopped[0]) < len(expected[0]) and summary["hit_max_new_tokens"] < 2


def test_generate_from_an_instruction_list(chatty, capsys, tmp_path):
    source = tmp_path / "alpaca_eval.json"
    source.write_text(json.dumps(["Name a fruit.", {"instruction": "Say hello.", "dataset": "helpful_base", "output": "x"}]))
    out = tmp_path / "outputs.json"
    summary = _run(["generate", "--model", str(chatty), "--instructions", str(source), "--max_new_tokens", "4",
                    "--temperature", "0.7", "--top_p", "0.9", "--output_file", str(out)], capsys)
    records = json.loads(out.read_text())
    assert [(r["instruction"], r["dataset"], r["generator"]) for r in records] == [
        ("Name a fruit.", "alpaca_eval", "chatty"), ("Say hello.", "helpful_base", "chatty")]
    assert all(isinstance(r["output"], str) for r in records) and summary["decoding"]["temperature"] == 0.7


@pytest.mark.slow
@pytest.mark.vllm
def test_generate_vllm_matches_hf(chatty, capsys, tmp_path):
    pytest.importorskip("vllm")
    common = ["generate", "--model", str(chatty), "--dataset", "embedded", "--max_samples", "3", "--max_new_tokens", "16",
              "--dtype", "float32"]
    # Stop at a token the model emits, so the end-of-turn handling is compared too.
    from transformers import AutoTokenizer

    generated: list[list[int]] = []
    _direct_generate(chatty, [_test_rows(1)[0]["chosen"][:-1]], 16, ids_out=generated)
    stop = AutoTokenizer.from_pretrained(str(chatty)).convert_ids_to_tokens(generated[0][6])
    common += ["--end_of_turn_token", stop]
    hf = _run(common + ["--output_file", str(tmp_path / "hf.json")], capsys)
    vl = _run(common + ["--backend", "vllm", "--kv_cache_memory_bytes", str(256 * 2**20), "--batch_tokens", "512",
                        "--output_file", str(tmp_path / "vllm.json")], capsys)
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("hf", "vllm"))
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert [r["instruction"] for r in a] == [r["instruction"] for r in b]
    assert hf["hit_max_new_tokens"] == vl["hit_max_new_tokens"] < 3


# -- bad input: one clear line, exit status 1 ----------------------------------------------------


def _error(argv: list[str], capsys) -> str:
    assert eval_main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("wspo-eval")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_gives_one_line_errors(tiny_models, capsys, tmp_path):
    missing = tmp_path / "no_such_model"
    line = _error(["rewards", "--policy", str(missing), "--reference", str(tiny_models["weak_ref"]), "--dataset", "embedded"], capsys)
    assert line.startswith("wspo-eval rewards: error: policy:") and str(missing) in line
    line = _error(["generate", "--model", str(missing), "--dataset", "embedded", "--output_file", str(tmp_path / "o.json")], capsys)
    assert line.startswith("wspo-eval generate: error: model:") and str(missing) in line

    # A dataset of prompts and chosen responses only.
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in _test_rows(3)))
    line = _error(["rewards", "--policy", str(tiny_models["weak_aligned"]), "--reference", str(tiny_models["weak_ref"]),
                   "--dataset", str(data)], capsys)
    assert "has no rejected responses" in line and str(data) in line

    # A shard set of chosen rows only (WSPO's phase one).
    shards = tmp_path / "chosen_only"
    assert precompute_main(["--weak_ref", str(tiny_models["weak_ref"]), "--dataset_split", "test_prefs", "--max_samples", "3",
                            "--output_dir", str(shards)]) == 0
    capsys.readouterr()
    line = _error(["rewards", "--policy", str(tiny_models["weak_aligned"]), "--reference_column", "weak_ref",
                   "--shards", str(shards)], capsys)
    assert "has no rejected rows (slots: chosen=3)" in line and "--slots chosen,rejected" in line

    line = _error(["rewards", "--policy", str(tiny_models["weak_aligned"]), "--reference", str(tiny_models["weak_ref"])], capsys)
    assert "exactly one of dataset" in line
