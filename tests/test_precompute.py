"""Phase one end to end: shard contents, layouts, bad input, workers, verification."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wspo.precompute.cli import main as precompute_main
from wspo.precompute.config import PrecomputeArguments
from wspo.precompute.pipeline import PrecomputeError, run
from wspo.shards.schema import FORMAT_VERSION, row_id, row_schema
from wspo.shards.manifest import manifest_checksum
from wspo.shards.store import ShardError, ShardSet, list_arrays
from wspo.shards.tokenization import ResponseTokenizer


def make_args(tiny_models, out, **overrides) -> PrecomputeArguments:
    options = dict(
        output_dir=str(out), weak_ref=str(tiny_models["weak_ref"]), weak_aligned=str(tiny_models["weak_aligned"]),
        max_length=512, max_prompt_length=256, max_samples=24, rows_per_file=10, batch_tokens=2048,
    )
    options.update(overrides)
    return PrecomputeArguments(**options)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def shards(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    run(make_args(tiny_models, out, slots="chosen,rejected"))
    return ShardSet.open(out).check()


def naive_logprobs(model_dir, input_ids: list[int], start: int) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(input_ids[1:])[:, None])[:, 0]
    return logp[start - 1 :].numpy()


def test_rows_follow_the_contract(shards, tiny_models):
    table = shards.read_table()
    assert table.schema.remove_metadata() == row_schema(["weak_ref", "weak_aligned"])
    manifest = shards.manifests[0]
    counts = manifest["counts"]
    # Conservation: every requested (row, slot) sequence is written or skipped with a reason.
    assert counts["sequences_requested"] == 24 * 2 == counts["rows_written"] + sum(counts["skipped"].values())
    assert table.num_rows == counts["rows_written"] == shards.num_rows
    assert sorted(set(table["slot"].to_pylist())) == ["chosen", "rejected"]
    assert len(shards.files) == -(-table.num_rows // 10)  # parts of rows_per_file rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["weak_ref"])
    rule = ResponseTokenizer(tokenizer, 512, 256)
    ref, aligned, reward = (list_arrays(table[c]) for c in ("logp_weak_ref", "logp_weak_aligned", "reward"))
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        messages = json.loads(row["messages"])
        assert row["id"] == row_id(messages, row["response"])
        tok = rule(messages, row["response"])
        assert row["token_ids"] == tok.token_ids and row["n_tokens"] == len(tok.token_ids)
        assert row["token_start"] == tok.token_start and row["token_end"] == tok.token_end
        assert len(ref[i]) == len(aligned[i]) == len(reward[i]) == row["n_tokens"]
        expected = (aligned[i].astype(np.float64) - ref[i].astype(np.float64)).astype(np.float32)
        assert np.array_equal(reward[i], expected)
        assert row["reward_sum"] == float(reward[i].astype(np.float64).sum())
    # The stored log-probs are the models' own: compare two rows with a naive full forward.
    for i in (0, len(rows) - 1):
        tok = rule(json.loads(rows[i]["messages"]), rows[i]["response"])
        for name, stored in (("weak_ref", ref[i]), ("weak_aligned", aligned[i])):
            naive = naive_logprobs(tiny_models[name], tok.input_ids, len(tok.prompt_ids))
            assert np.abs(naive - stored).max() < 1e-4
    assert manifest["reward"]["tokens"] == shards.num_tokens


def test_parquet_settings(shards):
    meta = pq.ParquetFile(shards.root / shards.files[0]["path"]).metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert all(c.compression == "ZSTD" for c in columns.values())
    for name in ("reward.list.element", "logp_weak_ref.list.element", "logp_weak_aligned.list.element"):
        assert "BYTE_STREAM_SPLIT" in columns[name].encodings
        assert not any("DICTIONARY" in e for e in columns[name].encodings)
    assert "BYTE_STREAM_SPLIT" in columns["reward_sum"].encodings


def test_manifest_records_models_tokenizer_and_files(shards, tiny_models):
    m = shards.manifests[0]
    assert [s["name"] for s in m["scorers"]] == ["weak_ref", "weak_aligned"]
    assert m["scorers"][0]["fingerprint"] != m["scorers"][1]["fingerprint"]
    assert m["scorers"][0]["dtype"] == "float32" and m["scorers"][0]["backend"] == "hf"
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["weak_ref"])
    assert m["tokenizer"]["fingerprint"] == ResponseTokenizer(tokenizer, 512, 256).fingerprint
    assert m["workers"] == {"num_workers": 1, "worker_index": 0}
    assert sum(f["rows"] for f in m["files"]) == m["counts"]["rows_written"]
    assert not list(shards.root.glob("_work-*")) and not list(shards.root.glob("*.tmp"))


def test_cli_yaml_recipe_and_override(tiny_models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"weak_ref: {tiny_models['weak_ref']}\nweak_aligned: {tiny_models['weak_aligned']}\n"
        f"output_dir: {tmp_path / 'wrong'}\nmax_length: 512\nmax_prompt_length: 256\nmax_samples: 50\n"
    )
    assert precompute_main([str(recipe), "--output_dir", str(tmp_path / "out"), "--max_samples", "6"]) == 0
    assert ShardSet.open(tmp_path / "out").num_rows == 6 and not (tmp_path / "wrong").exists()
    assert "wrote 6 rows" in capsys.readouterr().out
    recipe.write_text(recipe.read_text() + "weak_reff: typo\n")
    with pytest.raises(SystemExit):
        precompute_main([str(recipe)])
    assert "weak_reff" in capsys.readouterr().err


def test_other_layouts_and_sources(tiny_models, tmp_path):
    lf = [{"instruction": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}. I hope this helps!",
           "rejected": "No idea.", **({"system": "Be exact."} if i % 2 else {})} for i in range(5)]
    run(make_args(tiny_models, tmp_path / "lf", dataset=str(write_jsonl(tmp_path / "lf.jsonl", lf)), dataset_split="train"))
    table = ShardSet.open(tmp_path / "lf").read_table()
    assert ShardSet.open(tmp_path / "lf").manifests[0]["run_settings"]["dataset"]["format"] == "llamafactory"
    assert json.loads(table["messages"][1].as_py()) == [{"role": "system", "content": "Be exact."},
                                                       {"role": "user", "content": "Question 1: what is 1 + 1?"}]
    assert table["response"][2].as_py() == "It is 4. I hope this helps!"

    # Any other layout through column_map, from a Parquet file in a folder of split files.
    import pyarrow as pa

    folder = tmp_path / "custom"
    folder.mkdir()
    pq.write_table(pa.table({"q": ["Hi?", "Bye?"], "good": ["Hello there!", "Goodbye!"], "bad": ["...", "."],
                             "uid": ["a1", "b2"]}), folder / "train-00000.parquet")
    run(make_args(tiny_models, tmp_path / "cm", dataset=str(folder), dataset_split="train", dataset_format="columns",
                  column_map="prompt=q,chosen=good,rejected=bad,id=uid", slots="chosen,rejected"))
    table = ShardSet.open(tmp_path / "cm").read_table()
    assert table["example_id"].to_pylist() == ["a1", "a1", "b2", "b2"]
    assert table["response"].to_pylist() == ["Hello there!", "...", "Goodbye!", "."]


MALFORMED = [
    ({"prompt_id": "m1", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "missing_field"),
    ({"prompt": "p", "prompt_id": "m2", "chosen": "not a list"}, "wrong_type"),
    ({"prompt": "p", "prompt_id": "m3", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty_response"),
    ({"prompt": "p", "prompt_id": "m4", "chosen": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "last_turn_not_assistant"),
    ({"prompt": "p", "prompt_id": "m5", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}, "wrong_type"),
]


def test_malformed_rows_are_counted_or_fail_in_strict_mode(tiny_models, tmp_path):
    good = json.loads((__import__("wspo.embedded.sample", fromlist=["SAMPLE_DIR"]).SAMPLE_DIR / "train_prefs.jsonl").read_text().splitlines()[0])
    rows = [good] + [row for row, _ in MALFORMED] + [good | {"prompt_id": "long", "chosen": [{"role": "user", "content": "word " * 400}, good["chosen"][-1]]}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    manifest = run(make_args(tiny_models, tmp_path / "out", dataset=str(data), dataset_split="train"))
    assert manifest["counts"]["rows_written"] == 1
    assert manifest["counts"]["skipped"] == {"empty_response": 1, "last_turn_not_assistant": 1, "missing_field": 1,
                                             "prompt_too_long": 1, "wrong_type": 2}
    with pytest.raises(PrecomputeError, match=r"row 1: missing_field: field 'prompt'"):
        run(make_args(tiny_models, tmp_path / "strict", dataset=str(data), dataset_split="train", strict=True))
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_missing_model_and_dataset_are_named(tiny_models, tmp_path, capsys):
    assert precompute_main(["--output_dir", str(tmp_path / "o"), "--weak_ref", str(tmp_path / "nope"),
                            "--weak_aligned", str(tiny_models["weak_aligned"])]) == 1
    err = capsys.readouterr().err
    assert "weak_ref" in err and "nope" in err and "Traceback" not in err
    assert precompute_main(["--output_dir", str(tmp_path / "o"), "--weak_ref", str(tiny_models["weak_ref"]),
                            "--weak_aligned", str(tiny_models["weak_aligned"]), "--dataset", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl" in capsys.readouterr().err


def test_nan_logprobs_stop_the_run_and_publish_nothing(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["weak_aligned"], broken)
    model = AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    out = tmp_path / "out"
    with pytest.raises(PrecomputeError, match=r"weak_aligned .* NaN or infinite log-probs for 10 row\(s\)"):
        run(make_args(tiny_models, out, weak_aligned=str(broken)))
    assert not (out / "manifest.json").exists() and not list(out.glob("data/part-*.parquet"))
    with pytest.raises(ShardError, match="no manifest"):
        ShardSet.open(out)


def test_workers_write_disjoint_parts_of_one_set(shards, tiny_models, tmp_path):
    out = tmp_path / "multi"
    for i in (2, 0):
        run(make_args(tiny_models, out, slots="chosen,rejected", num_workers=3, worker_index=i))
    with pytest.raises(ShardError, match="worker manifests missing .*manifest-00001-of-00003.json"):
        ShardSet.open(out)
    run(make_args(tiny_models, out, slots="chosen,rejected", num_workers=3, worker_index=1))
    multi = ShardSet.open(out).check()
    single = shards.read_table()
    table = multi.read_table()
    # Disjoint and complete: the same rows in the same order, with the same numbers up to float
    # rounding (other batch compositions change the last bits of a matmul).
    assert table["id"].to_pylist() == single["id"].to_pylist()
    flat = [np.concatenate(list_arrays(t["reward"])) for t in (table, single)]
    assert flat[0].shape == flat[1].shape and np.abs(flat[0] - flat[1]).max() < 1e-5
    # A worker that ran other settings is caught.
    manifest_path = out / "manifest-00001-of-00003.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["max_length"] = 1024
    manifest["checksum"] = manifest_checksum(manifest)  # a genuine manifest of another run, not an edit
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="manifest-00001-of-00003.json: 'tokenizer' differs"):
        ShardSet.open(out)


def test_verify_names_truncated_altered_and_missing_files(shards, tmp_path, capsys):
    from wspo.shards.cli import main as shards_main

    copy = tmp_path / "copy"
    shutil.copytree(shards.root, copy)
    files = [f["path"] for f in shards.files]
    assert shards_main(["verify", str(copy)]) == 0
    data = (copy / files[0]).read_bytes()
    (copy / files[0]).write_bytes(data[: len(data) // 2])  # truncated
    altered = bytearray((copy / files[1]).read_bytes())
    altered[100] ^= 0xFF  # same size, different bytes
    (copy / files[1]).write_bytes(bytes(altered))
    (copy / files[2]).unlink()
    assert shards_main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"{files[0]}: " in err and "truncated" in err
    assert f"{files[1]}: sha256 does not match" in err
    assert f"{files[2]}: missing" in err
    with pytest.raises(ShardError, match="does not verify"):
        ShardSet.open(copy).check()


def test_schema_version_from_the_future(shards, tmp_path):
    copy = tmp_path / "future"
    shutil.copytree(shards.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"manifest.json: shard format version {FORMAT_VERSION + 1} is newer"):
        ShardSet.open(copy)
    manifest["format_version"] = 2
    manifest["tokenizer"]["fingerprint_version"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="manifest.json: tokenizer fingerprint version 3 is newer"):
        ShardSet.open(copy)


def test_other_settings_in_output_dir_fail_unless_overwrite(shards, tiny_models, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(shards.root, out)
    # The same command again: already complete, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run(make_args(tiny_models, out, slots="chosen,rejected"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(PrecomputeError, match="other settings"):
        run(make_args(tiny_models, out, slots="chosen"))
    run(make_args(tiny_models, out, slots="chosen", overwrite=True))
    assert set(ShardSet.open(out).read_table()["slot"].to_pylist()) == {"chosen"}


def test_info_and_head(shards, capsys):
    from wspo.shards.cli import main as shards_main

    assert shards_main(["info", str(shards.root)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == shards.num_rows and info["response_tokens"] == shards.num_tokens
    assert [s["name"] for s in info["scorers"]] == ["weak_ref", "weak_aligned"]
    rewards = np.concatenate(list_arrays(shards.read_table(columns=["reward"])["reward"])).astype(np.float64)
    assert info["reward"]["token_mean"] == round(float(rewards.mean()), 6)
    assert shards_main(["head", str(shards.root), "-n", "1", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    first = shards.read_table().slice(0, 1).to_pylist()[0]
    piece = first["response"][first["token_start"][0] : first["token_end"][0]]
    assert repr(piece) in out and f"{first['reward'][0]:.4f}" in out


def test_reference_scoring_and_wrpo_layout(tiny_models, tmp_path):
    """One reference model (DPO/WRPO): column logp_ref, no reward; the WRPO layout is detected."""
    def conversation(answer):
        return [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": answer}]

    rows = [{"prompt": "Name a colour.", "prompt_id": f"w{i}", "chosen": [conversation(f"Blue {i}."), conversation(f"Red {i}!")],
             "rejected": [conversation("No.")]} for i in range(3)]
    data = write_jsonl(tmp_path / "wrpo.jsonl", rows)
    manifest = run(make_args(tiny_models, tmp_path / "out", dataset=str(data), dataset_split="train", weak_ref=None,
                             weak_aligned=None, ref_model=str(tiny_models["weak_ref"]),
                             slots="chosen_source,chosen_target,rejected"))
    assert manifest["run_settings"]["dataset"]["format"] == "wrpo"
    assert [s["name"] for s in manifest["scorers"]] == ["ref"]
    table = ShardSet.open(tmp_path / "out").read_table()
    assert table.schema.remove_metadata() == row_schema(["ref"]) and "reward" not in table.column_names
    assert table["slot"].to_pylist()[:3] == ["chosen_source", "chosen_target", "rejected"]
    assert table["response"].to_pylist()[:3] == ["Blue 0.", "Red 0!", "No."]
    assert table["example_id"].to_pylist() == ["w0"] * 3 + ["w1"] * 3 + ["w2"] * 3


def test_rerun_rebuilds_files_that_no_longer_verify(shards, tiny_models, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(shards.root, out)
    names = [f["path"] for f in shards.files]
    original = {name: (out / name).read_bytes() for name in names}
    damaged = bytearray(original[names[1]])
    damaged[200] ^= 0xFF
    (out / names[1]).write_bytes(bytes(damaged))
    (out / names[2]).unlink()
    run(make_args(tiny_models, out, slots="chosen,rejected"))  # the same command again
    ShardSet.open(out).check()
    assert {name: (out / name).read_bytes() for name in names} == original


def test_another_number_of_workers_in_the_same_directory(shards, tiny_models, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(shards.root, out)
    with pytest.raises(PrecomputeError, match="another number of workers .*manifest.json"):
        run(make_args(tiny_models, out, slots="chosen,rejected", num_workers=2, worker_index=0))
    (out / "manifest-00000-of-00002.json").write_text((out / "manifest.json").read_text())
    with pytest.raises(ShardError, match="both manifest.json .* and worker manifests"):
        ShardSet.open(out)


def test_chat_template_that_rejects_a_row(tiny_models, tmp_path):
    strict_template = tmp_path / "tok"
    shutil.copytree(tiny_models["weak_ref"], strict_template)
    tokenizer = AutoTokenizer.from_pretrained(strict_template)
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                               + tokenizer.chat_template)
    tokenizer.save_pretrained(strict_template)
    rows = [{"instruction": "Hi?", "chosen": "Hello!", "rejected": "No."},
            {"instruction": "Hi?", "system": "Be brief.", "chosen": "Hello.", "rejected": "No."}]
    data = write_jsonl(tmp_path / "lf.jsonl", rows)
    manifest = run(make_args(tiny_models, tmp_path / "out", dataset=str(data), dataset_split="train",
                             weak_ref=None, ref_model=str(strict_template), weak_aligned=None))
    assert manifest["counts"]["skipped"] == {"template_error": 1} and manifest["counts"]["rows_written"] == 1
    with pytest.raises(PrecomputeError, match="row 1: template_error: .*System role not supported"):
        run(make_args(tiny_models, tmp_path / "strict", dataset=str(data), dataset_split="train", strict=True,
                      weak_ref=None, ref_model=str(strict_template), weak_aligned=None))


def test_scorers_open_without_the_tokenizer_and_each_close_hands_its_memory_back(tiny_models, tmp_path, monkeypatch):
    """Memory holds what the step needs: the parts carry the sequences, so the run's tokenizer is
    freed before a scorer loads or scores, and every closed scorer hands its freed memory back."""
    import gc
    import weakref

    import wspo.precompute.pipeline as pipeline
    import wspo.precompute.scorers as scorers

    events, tokenizers = [], []
    original_open, original_load_tokenizer = pipeline.open_scorer, pipeline.load_tokenizer

    def load_tokenizer(*args, **kwargs):
        tokenizer = original_load_tokenizer(*args, **kwargs)
        tokenizers.append(weakref.ref(tokenizer))
        return tokenizer

    def open_scorer(*args, **kwargs):
        gc.collect()
        events.append(("open", sum(ref() is not None for ref in tokenizers)))
        scorer = original_open(*args, **kwargs)
        events.append(("model", weakref.ref(scorer.model)))
        return scorer

    monkeypatch.setattr(pipeline, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(pipeline, "open_scorer", open_scorer)
    monkeypatch.setattr(scorers, "release_freed_memory", lambda: events.append(("released", None)))
    run(make_args(tiny_models, tmp_path / "out", max_samples=6))
    assert tokenizers  # the run loaded its tokenizer through the patched name
    assert [e[0] for e in events] == ["open", "model", "released"] * 2
    assert [e[1] for e in events if e[0] == "open"] == [0, 0]  # the run's tokenizer is gone by then
    assert all(e[1]() is None for e in events if e[0] == "model")  # each model freed when its scorer closed


def test_release_freed_memory_returns_the_heap_to_the_system():
    """Freed blocks that malloc keeps in its heap (a model cast on load is built of such blocks)
    go back to the system. In a child whose malloc keeps every freed block (mmap and automatic
    trimming off, so the result does not hang on the heap's layout): resident after `del`, not
    after release_freed_memory."""
    import subprocess
    import sys

    from wspo.models import _LIBC

    if _LIBC is None:
        pytest.skip("not glibc: nothing to trim")
    child = """
import ctypes, json, torch
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-1, 2**30) and libc.mallopt(-3, 2**25)  # M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD 32 MiB
from wspo.models import release_freed_memory
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) / 1024
blocks = [torch.ones(2**19) for _ in range(64)]  # 64 x 2 MiB, written
held = anon(); del blocks; kept = anon(); release_freed_memory()
print(json.dumps([held, kept, anon()]))
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    held, kept, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert held - kept < 16, (held, kept)  # freed, still resident
    assert held - after > 100, (held, kept, after)  # most of the 128 MiB went back


def test_freed_memory_kept_reuses_large_blocks_and_gives_them_back_on_leaving():
    """Training on CPU keeps freed memory (wspo.models.freed_memory_kept): a 64 MiB block (above
    glibc's largest mmap threshold, like a 0.5B model's gradients) freed inside stays resident
    for the next step to reuse, where by default it goes back to the kernel at once; on leaving,
    the defaults return and the kept memory is handed back. In a child: it changes the process's
    malloc."""
    import subprocess
    import sys

    from wspo.models import _LIBC

    if _LIBC is None:
        pytest.skip("not glibc: nothing to keep")
    child = """
import json, torch
from wspo.models import freed_memory_kept
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) / 1024
def freed_64_mib():  # resident MiB a written-then-freed 64 MiB block leaves behind
    before = anon(); block = torch.ones(2**24); del block
    return anon() - before
default = freed_64_mib()
with freed_memory_kept() as kept:
    inside = freed_64_mib()
    held = anon()
after = anon()
print(json.dumps([kept, default, inside, held - after, freed_64_mib()]))
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    kept, default, inside, returned, default_again = json.loads(out.stdout.strip().splitlines()[-1])
    assert kept is True
    assert default < 8 and default_again < 8, (default, default_again)  # unmapped at once
    assert inside > 56, inside  # kept for reuse
    assert returned > 56, returned  # handed back on leaving
