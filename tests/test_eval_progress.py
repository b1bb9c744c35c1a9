"""`wspo-eval` progress and summary: tokens/s figures, and rows with invalid text skipped and counted."""

from __future__ import annotations

import json

from test_eval import _run, _test_rows

BROKEN = "a lone surrogate \ud83d here"


def _with_broken_rows(tmp_path, n: int = 4):
    rows = _test_rows(n)
    rows[1] = dict(rows[1], chosen=rows[1]["chosen"][:-1] + [{"role": "assistant", "content": BROKEN}]) \
        if isinstance(rows[1]["chosen"], list) else dict(rows[1], chosen=BROKEN)
    path = tmp_path / "prefs.jsonl"
    # json.dumps escapes the surrogate as \ud83d; reading it back gives the lone surrogate again.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def test_rewards_skip_invalid_text_and_report_tokens_per_second(tiny_models, capsys, tmp_path):
    path, rows = _with_broken_rows(tmp_path)
    summary = _run(["rewards", "--policy", str(tiny_models["weak_aligned"]), "--reference", str(tiny_models["weak_ref"]),
                    "--dataset", str(path)], capsys)
    assert summary["pairs"] == len(rows) - 1
    assert summary["skipped"] == {"invalid_text": 1}
    assert summary["scored_tokens_per_second"] > 0


def test_generate_skips_invalid_text_and_reports_tokens_per_second(tiny_models, capsys, tmp_path):
    source = tmp_path / "instructions.json"
    source.write_text(json.dumps(["Name a fruit.", BROKEN, "Say hello."]))
    out = tmp_path / "outputs.json"
    summary = _run(["generate", "--model", str(tiny_models["weak_ref"]), "--instructions", str(source),
                    "--max_new_tokens", "3", "--output_file", str(out)], capsys)
    assert summary["outputs"] == 2 and summary["skipped"] == {"invalid_text": 1}
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["Name a fruit.", "Say hello."]
    assert summary["generated_tokens"] > 0 and summary["generated_tokens_per_second"] > 0
