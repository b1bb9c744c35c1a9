"""Offline distillation (docs/distill.md): top-k columns in phase one, `--loss kd` in phase two.

The teacher is the tiny weak model with its final norm scaled up 8x (the same body, sharply
peaked predictions), the student the unscaled weak model: a student that can learn its teacher.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from wspo.shards.topk import MAX_ERROR, decode_topk, encode_topk, ids_column, logps_column

K = 16
SAMPLES = 12


@pytest.fixture(scope="module")
def teacher(tiny_models, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("teacher")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["weak_ref"]), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_models["weak_ref"])).save_pretrained(str(out))
    return out


def precompute(tiny_models, teacher, out, encoding="fp32", topk_override=None, **keys):
    from wspo.precompute.config import PrecomputeArguments
    from wspo.precompute.pipeline import run

    if topk_override is not None:  # in-process, so the error arrives as the exception
        run(PrecomputeArguments(output_dir=str(out), teacher=str(teacher), topk=topk_override, max_samples=2,
                                max_length=256, max_prompt_length=192))
    from wspo.precompute.cli import main

    argv = ["--output_dir", str(out), "--weak_ref", str(tiny_models["weak_ref"]), "--teacher", str(teacher),
            "--topk", str(K), "--topk_encoding", encoding, "--max_samples", str(SAMPLES), "--max_length", "256",
            "--max_prompt_length", "192", "--rows_per_file", "5", "--dtype", "float32"]
    for key, value in keys.items():
        argv += [f"--{key}", str(value)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def exact_set(tiny_models, teacher, tmp_path_factory):
    return precompute(tiny_models, teacher, tmp_path_factory.mktemp("exact") / "shards", "fp32")


@pytest.fixture(scope="module")
def compact_set(tiny_models, teacher, tmp_path_factory):
    return precompute(tiny_models, teacher, tmp_path_factory.mktemp("compact") / "shards", "compact")


def rows_of(root):
    from wspo.shards.store import ShardSet

    shards = ShardSet.open(root).check()
    return shards, shards.read_table().to_pylist()


def naive_topk(model_dir, row, k=K):
    """Full logits, log_softmax, topk over the response positions of one shard row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wspo.shards.tokenization import ResponseTokenizer

    rule = ResponseTokenizer(AutoTokenizer.from_pretrained(str(model_dir)), 256, 192)
    prompt = rule.prompt_ids(json.loads(row["messages"]))
    ids = prompt + row["token_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[len(prompt) - 1 : -1]
    values, top = logp.topk(k, -1)
    return values.numpy(), top.numpy()


def test_encoding_round_trip_and_error():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 151_936, generator=generator) * 4
    values, ids = torch.log_softmax(logits, -1).topk(128, -1)
    values, ids = values.numpy(), ids.numpy()
    for encoding in ("fp32", "compact"):
        flat_ids, flat_logps = encode_topk(values, ids, encoding)
        assert flat_ids.dtype == np.int32 and flat_ids.size == 50 * 128
        got_ids, got_logps = decode_topk(flat_ids, flat_logps, 128, encoding)
        # compact reorders each position by id: compare position by position as (id -> log-prob)
        for p in range(50):
            want = dict(zip(ids[p].tolist(), values[p].tolist()))
            got = dict(zip(got_ids[p].tolist(), got_logps[p].tolist()))
            assert got.keys() == want.keys()
            error = max(abs(got[i] - want[i]) for i in want)
            assert error <= MAX_ERROR[encoding] + 1e-6
    assert MAX_ERROR["compact"] <= 2e-3


def test_phase_one_stores_the_teachers_top_k(exact_set, compact_set, teacher):
    shards, rows = rows_of(exact_set)
    manifest = shards.manifests[0]
    assert manifest["format_version"] == 3 and manifest["topk"]["k"] == K and manifest["topk"]["scorers"] == ["teacher"]
    compact, compact_rows = rows_of(compact_set)
    assert compact.topk["encoding"] == "compact"
    assert [r["id"] for r in rows] == [r["id"] for r in compact_rows]
    worst = 0.0
    for i, (row, crow) in enumerate(zip(rows, compact_rows)):
        ids, logps = decode_topk(row[ids_column("teacher")], row[logps_column("teacher")], K, "fp32")
        assert ids.shape == (len(row["token_ids"]), K)
        if i < 3:  # the stored top-k equal a naive full-vocabulary forward
            want_values, want_ids = naive_topk(teacher, row)
            assert (ids == want_ids).all()
            assert np.abs(logps - want_values).max() < 1e-4
        # the actual token's log-prob is the same one whenever it is in the top-k
        actual = np.asarray(row["logp_teacher"])
        hit = ids == np.asarray(row["token_ids"])[:, None]
        assert np.abs((logps - actual[:, None])[hit]).max(initial=0) < 1e-5
        cids, clogps = decode_topk(crow[ids_column("teacher")], crow[logps_column("teacher")], K, "compact")
        order = np.argsort(ids, 1)
        assert (np.take_along_axis(ids, order, 1) == cids).all()
        worst = max(worst, float(np.abs(np.take_along_axis(logps, order, 1) - clogps).max()))
    assert 0 < worst <= MAX_ERROR["compact"] + 1e-6


def test_sets_without_top_k_stay_version_2_and_newer_versions_are_refused(exact_set, tiny_models, tmp_path, monkeypatch):
    from wspo.precompute.cli import main
    from wspo.shards import manifest
    from wspo.shards.store import ShardError, ShardSet

    plain = tmp_path / "plain"
    assert main(["--output_dir", str(plain), "--weak_ref", str(tiny_models["weak_ref"]), "--max_samples", "3",
                 "--max_length", "256", "--max_prompt_length", "192"]) == 0
    assert json.loads((plain / "manifest.json").read_text())["format_version"] == 2
    # a reader of version 2 (the toolkit before top-k columns) refuses a version-3 set, naming it
    monkeypatch.setattr(manifest, "FORMAT_VERSION", 2)
    with pytest.raises(ShardError, match=r"manifest.json: shard format version 3 is newer than this toolkit reads \(version 2\); upgrade wspo"):
        ShardSet.open(exact_set)
    ShardSet.open(plain)  # version 2 stays readable


def test_resume_verify_and_card_cover_the_top_k_columns(tiny_models, teacher, compact_set, tmp_path):
    from wspo.shards.store import ShardSet

    copy = tmp_path / "copy"
    shutil.copytree(compact_set, copy)
    first = {f["path"]: f["sha256"] for f in ShardSet.open(copy).files}
    # an interrupted run: the manifest and one part gone; the rerun redoes it byte for byte
    (copy / "manifest.json").unlink()
    (copy / sorted(first)[1]).unlink()
    precompute(tiny_models, teacher, copy, "compact")
    assert {f["path"]: f["sha256"] for f in ShardSet.open(copy).check().files} == first
    card = (copy / "README.md").read_text()
    assert "shard format version 3" in card and f"the {K} most likely token ids" in card
    # a flipped byte in a part (its top-k columns are most of it) is found by verify
    part = copy / sorted(first)[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert any("sha256 does not match" in p for p in ShardSet.open(copy).verify())


def test_show_and_info_cover_the_top_k_columns(compact_set, tmp_path, capsys):
    from wspo.shards.cli import main

    assert main(["info", str(compact_set)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 3 and info["topk"]["k"] == K
    assert 0 < info["topk"]["bytes_per_token"]["teacher"] < K * 6  # raw int32 + float32 would be K * 8
    page = tmp_path / "show.html"
    assert main(["show", str(compact_set), "--html", str(page)]) == 0
    text = page.read_text()
    assert text.count(f"teacher top {K}: ") == sum(r["n_tokens"] for r in rows_of(compact_set)[1])


# -- phase two -------------------------------------------------------------------------------


def student_batch(shards_dir, student_dir, tmp_path, packing: bool = False):
    from transformers import AutoTokenizer

    from wspo.train.batches import Collator
    from wspo.train.shard_sets import open_shard_sets, strong_rule
    from wspo.train.distill import teacher_columns
    from wspo.train.rows import row_datasets

    sets = open_shard_sets([str(shards_dir)], "kd")
    teacher = teacher_columns(sets, None)
    rule, projected = strong_rule(sets, AutoTokenizer.from_pretrained(str(student_dir)), 256, "none", distill=True)
    train, _, _ = row_datasets(sets, rule, "kd", projected, 0.0, tmp_path / "cache", Counter(), teacher=teacher)
    examples = [train[i] for i in range(6)]
    return Collator(0, 256 if packing else None)(examples), examples


def online_kd_loss(student, teacher_model, examples, temperature):
    """The same loss online: the teacher's top-k from its full logits, the student's full
    log-softmax, the bucketed KL written out term by term."""
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        p = e.prompt_length
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher_model(ids).logits[0, p - 1 : -1].float(), -1)
        t_top, top_ids = t_logp.topk(K, -1)
        s_logp = torch.log_softmax(student(ids).logits[0, p - 1 : -1].float(), -1)
        s_top = s_logp.gather(1, top_ids)
        tiny = torch.finfo(torch.float32).tiny  # a bucket with no mass left
        t_cat = torch.cat([t_top, torch.log((1 - t_top.exp().sum(-1, keepdim=True)).clamp(min=tiny))], -1)
        s_cat = torch.cat([s_top, torch.log((1 - s_top.exp().sum(-1, keepdim=True)).clamp(min=tiny))], -1)
        t_cat, s_cat = torch.log_softmax(t_cat / temperature, -1), torch.log_softmax(s_cat / temperature, -1)
        total = total + (t_cat.exp() * (t_cat - s_cat)).sum() * temperature**2
        count += len(e.input_ids) - p
    return total / count


def test_kd_loss_and_gradients_equal_the_online_loss(exact_set, teacher, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from wspo.logprobs import response_logprobs
    from wspo.train.losses import kd_loss

    student = AutoModelForCausalLM.from_pretrained(str(tiny_models["weak_ref"]), dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    batches = [student_batch(exact_set, tiny_models["weak_ref"], tmp_path, packing) for packing in (False, True)]
    for temperature in (1.0, 2.0):
        check_against_online(student, teacher_model, batches, temperature)


def check_against_online(student, teacher_model, batches, temperature):
    from wspo.logprobs import response_logprobs
    from wspo.train.losses import kd_loss

    results = []
    for batch, examples in batches:  # padded, then packed
        student.zero_grad()
        logps, student_topk = response_logprobs(student, batch["input_ids"], batch.get("attention_mask"),
                                                batch["target_mask"], position_ids=batch.get("position_ids"),
                                                gather_ids=batch["topk_ids"])
        loss = kd_loss(logps, student_topk, batch["teacher_topk_logps"], temperature)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in student.parameters()]))
    student.zero_grad()
    online = online_kd_loss(student, teacher_model, examples, temperature)
    online.backward()
    assert online.item() > 0.5  # the peaked teacher is far from the student
    # to 1e-5 relative: float32 sums over ~600 tokens x (K + 1) categories differ in the last bits
    scale = max(float(p.grad.abs().max()) for p in student.parameters())
    for stored, grads in results:  # padded, then packed
        assert abs(stored - online.item()) <= 1e-5 * online.item()
        assert max(float((g - p.grad).abs().max()) for g, p in zip(grads, student.parameters())) <= 1e-5 * scale


def test_kd_alpha_mixes_in_the_sft_loss():
    from wspo.train.losses import kd_loss, kd_token_losses, sft_loss

    generator = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(7, 50, generator=generator), -1).topk(5, -1).values
    student = torch.log_softmax(torch.randn(7, 50, generator=generator), -1)[:, :5]
    logps = -torch.rand(7, generator=generator)
    kl = kd_token_losses(student, teacher).mean()
    assert torch.allclose(kd_loss(logps, student, teacher, alpha=0.25), 0.25 * kl + 0.75 * sft_loss(logps))
    # K = vocabulary: no bucket left, the plain KL
    full_t = torch.log_softmax(torch.randn(3, 20, generator=generator), -1)
    full_s = torch.log_softmax(torch.randn(3, 20, generator=generator), -1)
    assert torch.allclose(kd_token_losses(full_s, full_t), (full_t.exp() * (full_t - full_s)).sum(-1), atol=1e-5)


@pytest.mark.slow
def test_students_held_out_kl_falls_by_half(tiny_models, teacher, tmp_path):
    from wspo.train.cli import main

    shards = precompute(tiny_models, teacher, tmp_path / "shards", "compact", max_samples=40)
    argv = ["--shards", str(shards), "--model_name_or_path", str(tiny_models["weak_ref"]), "--loss", "kd",
            "--output_dir", str(tmp_path / "out"), "--max_length", "128", "--eval_fraction", "0.25",
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
            "--max_steps", "24", "--eval_strategy", "steps", "--eval_steps", "24", "--eval_on_start", "true",
            "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
            "--disable_tqdm", "true", "--seed", "0"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "wspo_run.json").read_text())
    kls = [h["eval_kd_kl"] for h in record["log_history"] if "eval_kd_kl" in h]
    print(f"held-out KL to the teacher: {kls[0]:.3f} -> {kls[-1]:.3f}")
    assert len(kls) >= 2 and kls[-1] <= 0.5 * kls[0]
    assert record["distill"] == {"scorer": "teacher", "k": K, "encoding": "compact", "kd_alpha": 1.0, "kd_temperature": 1.0}


def test_kd_refuses_sets_without_top_k_and_another_tokenizer(exact_set, tiny_models, tmp_path, capsys):
    from wspo.embedded.models import build_model, build_tokenizer
    from wspo.precompute.cli import main as precompute_main
    from wspo.train.cli import main

    def train(shards, model):
        argv = ["--shards", str(shards), "--model_name_or_path", str(model), "--loss", "kd", "--output_dir",
                str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none", "--use_cpu", "true"]
        before = {p: p.read_bytes() for p in Path(shards).rglob("*") if p.is_file()}
        rc = main(argv)
        assert {p: p.read_bytes() for p in Path(shards).rglob("*") if p.is_file()} == before  # inputs untouched
        return rc, capsys.readouterr().err.strip().splitlines()[-1]

    build_tokenizer(tmp_path / "other_tokenizer", vocab_size=1024)
    build_model(tmp_path / "other_student", tmp_path / "other_tokenizer", size="weak")
    rc, line = train(exact_set, tmp_path / "other_student")
    assert rc == 1 and "loss kd: the student's tokenizer" in line and "cross-tokenizer distillation is not supported" in line

    plain = tmp_path / "plain"
    assert precompute_main(["--output_dir", str(plain), "--weak_ref", str(tiny_models["weak_ref"]), "--max_samples", "3",
                            "--max_length", "256", "--max_prompt_length", "192"]) == 0
    rc, line = train(plain, tiny_models["weak_ref"])
    assert rc == 1 and "has no top-k columns (format version 2); loss kd needs" in line

    from wspo.train.config import WSPOArguments

    with pytest.raises(ValueError, match="loss kd needs the student to use the shards' tokenizer"):
        WSPOArguments(model_name_or_path="m", shards=["s"], loss="kd", reward_projection="chunks")
    with pytest.raises(ValueError, match="kd_alpha must be in"):
        WSPOArguments(model_name_or_path="m", shards=["s"], loss="kd", kd_alpha=1.5)


def test_topk_larger_than_the_vocabulary_is_refused(tiny_models, teacher, tmp_path):
    from wspo.precompute.pipeline import PrecomputeError

    with pytest.raises(PrecomputeError, match=r"topk 5000 exceeds the 2048 tokens of teacher .*; set --topk 2048 or lower"):
        precompute(tiny_models, teacher, tmp_path / "out", topk_override=5000)
    assert not (tmp_path / "out" / "manifest.json").exists()
