"""`--reference_logps shards`: the strong reference's log-probs scored in phase one
(`logp_strong_ref`) replace the reference model in training memory (DESIGN section 6)."""

from __future__ import annotations

import json

import pytest
from test_train_helpers import precompute, train_argv, train_setup  # noqa: F401  (fixture)

from wspo.train.cli import main as train_main


def run(capsys, argv):
    rc = train_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def losses(out):
    record = json.loads((out / "wspo_run.json").read_text())
    return record, [h["loss"] for h in record["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def scored_with_strong_ref(train_setup, tmp_path_factory):  # noqa: F811
    """The shared 48 rows scored by the weak pair and the strong SFT model in one phase-one run."""
    return precompute(tmp_path_factory.mktemp("with_strong_ref") / "shards", train_setup["weak_ref"],
                      train_setup["weak_aligned"], strong_ref=train_setup["strong_sft"])


@pytest.mark.parametrize("use_lora", ["false", "true"])
def test_reference_from_shards_trains_like_the_reference_model(train_setup, scored_with_strong_ref, tmp_path, capsys, use_lora):  # noqa: F811
    """Same run twice, reference computed in the job vs. read from the shards: the loss curves agree
    within 1e-5 (phase one scored the same fp32 model in its own padded batches, so per-token
    log-probs may differ by rounding; observed here: bit-identical curves)."""
    common = dict(shards=scored_with_strong_ref, max_steps=3, use_lora=use_lora, learning_rate=1e-2 if use_lora == "true" else 1e-3)
    rc, err = run(capsys, train_argv(train_setup, tmp_path / "model_ref", **common))
    assert rc == 0, err
    rc, err = run(capsys, train_argv(train_setup, tmp_path / "shard_ref", reference_logps="shards", **common))
    assert rc == 0, err
    (_, a), (record, b) = losses(tmp_path / "model_ref"), losses(tmp_path / "shard_ref")
    assert record["model"]["reference"] == "logp_strong_ref from shards"
    assert record["reference_shards"][0]["path"] == str(scored_with_strong_ref)
    assert len(a) == len(b) == 3 and a[-1] != a[0]
    assert b == pytest.approx(a, abs=1e-5)


def test_separate_reference_set_joined_on_id(train_setup, scored_with_strong_ref, tmp_path, capsys):  # noqa: F811
    """Training shards without logp_strong_ref plus the set that has it, joined on row id."""
    rc, err = run(capsys, train_argv(train_setup, tmp_path / "out", reference_logps="shards",
                                     reference_shards=scored_with_strong_ref, max_steps=1))
    assert rc == 0, err


def test_reference_shards_errors(train_setup, tmp_path, capsys):  # noqa: F811
    from wspo.embedded.models import perturb_model

    def error(argv):
        rc, err = run(capsys, argv)
        assert rc == 1 and "Traceback" not in err
        return err

    # The training shards hold no logp_strong_ref.
    err = error(train_argv(train_setup, tmp_path / "out", reference_logps="shards"))
    assert "no logp_strong_ref column" in err and "--strong_ref" in err

    # Scored with other weights than the model being trained.
    perturb_model(train_setup["strong_sft"], tmp_path / "other_strong")
    other = precompute(tmp_path / "other", None, None, samples=8, strong_ref=tmp_path / "other_strong")
    err = error(train_argv(train_setup, tmp_path / "out", reference_logps="shards", reference_shards=other))
    assert "whose weights differ from model_name_or_path" in err

    # Scored for fewer rows than the training shards hold: the first missing row is named.
    few = precompute(tmp_path / "few", None, None, samples=8, strong_ref=train_setup["strong_sft"])
    err = error(train_argv(train_setup, tmp_path / "out", reference_logps="shards", reference_shards=few))
    assert "has no logp_strong_ref in the reference shards" in err and "row " in err

    err = error(train_argv(train_setup, tmp_path / "out", reference_shards=few))
    assert "set --reference_logps shards" in err
