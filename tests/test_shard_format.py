"""Shard format version 2: a Hugging Face dataset folder that the usual tools read as it is; a
manifest that no longer agrees with its files is named; version 1 sets stay readable."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from wspo.precompute.config import PrecomputeArguments
from wspo.precompute.pipeline import run
from wspo.shards.cli import main as shards_main
from wspo.shards.manifest import manifest_checksum
from wspo.shards.store import ShardError, ShardSet


@pytest.fixture(scope="module")
def shard_dir(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    run(PrecomputeArguments(output_dir=str(out), weak_ref=str(tiny_models["weak_ref"]), weak_aligned=str(tiny_models["weak_aligned"]),
                            max_samples=20, max_length=384, max_prompt_length=256, rows_per_file=6, slots="chosen,rejected"))
    return out


def test_layout_is_a_dataset_folder(shard_dir):
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == ["README.md", "data", "manifest.json"]
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["checksum"] == manifest_checksum(manifest)
    assert all(f["path"].startswith("data/part-00000-") for f in manifest["files"])
    card = (shard_dir / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "path: data/*.parquet" in card
    assert "`logp_weak_ref`" in card and f"rows: {manifest['counts']['rows_written']:,}" in card
    assert manifest["command"].startswith("wspo-precompute")


def test_the_usual_tools_read_the_same_rows(shard_dir):
    expected = ShardSet.open(shard_dir).check().read_table(columns=["id"])["id"].to_pylist()
    import datasets

    loaded = datasets.load_dataset(str(shard_dir), split="train")
    assert loaded["id"] == expected and "reward" in loaded.column_names
    import pandas as pd

    assert pd.read_parquet(shard_dir / "data")["id"].tolist() == expected
    pl = pytest.importorskip("polars")
    assert pl.read_parquet(str(shard_dir / "data" / "*.parquet"))["id"].to_list() == expected
    duckdb = pytest.importorskip("duckdb")
    ids = [r[0] for r in duckdb.sql(f"select id from read_parquet('{shard_dir}/data/*.parquet')").fetchall()]
    assert ids == expected


def edited_copy(shard_dir, tmp_path, edit) -> tuple:
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    return copy


@pytest.mark.parametrize("case, expected", [
    ("removed_entry", "the manifest was edited after it was written"),
    ("removed_entry_resealed", "counts.rows_written is"),
    ("edited_count", "the manifest was edited after it was written"),
    ("unlisted_part", "unlisted: a Parquet part that no manifest lists"),
])
def test_a_manifest_that_disagrees_with_its_files_is_named(case, expected, shard_dir, tmp_path, capsys):
    def edit(copy, manifest):
        path = copy / "manifest.json"
        if case.startswith("removed_entry"):
            manifest["files"].pop()
            if case.endswith("resealed"):  # even with a recomputed checksum the counts give it away
                manifest["checksum"] = manifest_checksum(manifest)
            path.write_text(json.dumps(manifest))
        elif case == "edited_count":
            manifest["counts"]["rows_written"] -= 1
            path.write_text(json.dumps(manifest))
        else:
            shutil.copy(copy / manifest["files"][0]["path"], copy / "data" / "part-00000-09999.parquet")

    copy = edited_copy(shard_dir, tmp_path, edit)
    assert shards_main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    with pytest.raises(ShardError, match=expected.split(":")[0].replace(".", r"\.")):
        ShardSet.open(copy).check()


def test_version_1_sets_stay_readable(shard_dir, tmp_path, tiny_models):
    """A version-1 set (parts next to the manifest, no checksum, no card, the tokenizer
    fingerprint under its first definition) reads as before, and training still finds its
    tokenizer to be the strong model's (rewards token for token), alone or beside a new set."""
    from wspo.models import load_tokenizer
    from wspo.shards.tokenization import ResponseTokenizer
    from wspo.train.shard_sets import open_shard_sets, strong_rule

    copy = tmp_path / "v1"
    copy.mkdir()
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for record in manifest["files"]:
        name = record["path"].split("/")[-1]
        shutil.copy(shard_dir / record["path"], copy / name)
        record["path"] = name
    manifest["format_version"] = 1
    del manifest["checksum"], manifest["command"], manifest["tokenizer"]["fingerprint_version"]
    tokenizer = load_tokenizer(tiny_models["weak_ref"])
    manifest["tokenizer"]["fingerprint"] = ResponseTokenizer(tokenizer, 384, 256).fingerprint_v1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    v1, v2 = ShardSet.open(copy).check(), ShardSet.open(shard_dir).check()
    assert v1.read_table().equals(v2.read_table())
    assert shards_main(["verify", str(copy)]) == 0
    for paths in ([str(copy)], [str(copy), str(shard_dir)]):
        rule, projected = strong_rule(open_shard_sets(paths, "wspo"), tokenizer, 384, "none")
        assert not projected and rule.fingerprint == v2.tokenizer["fingerprint"]
    # A version-1 set of another tokenizer (here another chat template) beside a version-2 set:
    # the fingerprints cannot be compared, what does not depend on the definition can.
    manifest["tokenizer"]["chat_template_hash"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    from wspo.train.shard_sets import DataError

    with pytest.raises(DataError, match="tokenized with different tokenizers"):
        open_shard_sets([str(copy), str(shard_dir)], "wspo")


def test_sets_begun_before_fingerprint_definition_2_resume(tiny_models, tmp_path, monkeypatch):
    """A worker's part written by the previous release (tokenizer record under fingerprint
    definition 1) is found complete by the same command after the upgrade, nothing rewritten; the
    set's other worker, run after the upgrade, writes a record that agrees, so the set opens."""
    from wspo.models import load_tokenizer
    from wspo.shards.tokenization import ResponseTokenizer

    out = tmp_path / "set"

    def args(worker_index):
        return PrecomputeArguments(output_dir=str(out), weak_ref=str(tiny_models["weak_ref"]),
                                   weak_aligned=str(tiny_models["weak_aligned"]), max_samples=12, max_length=384,
                                   max_prompt_length=256, num_workers=2, worker_index=worker_index)

    original = ResponseTokenizer.describe
    with monkeypatch.context() as previous_release:
        previous_release.setattr(ResponseTokenizer, "describe", lambda self, fingerprint_version=1: original(self, 1))
        run(args(0))
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (manifest,) = out.glob("manifest-*.json")
    assert "fingerprint_version" not in json.loads(manifest.read_text())["tokenizer"]

    run(args(0))  # after the upgrade: the same command finds its part complete
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p in written} == written
    run(args(1))
    shard_set = ShardSet.open(out).check()
    assert "fingerprint_version" not in shard_set.tokenizer
    assert ResponseTokenizer(load_tokenizer(tiny_models["weak_ref"]), 384, 256).matches(shard_set.tokenizer)
