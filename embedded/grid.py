"""The table of scripts/grid.sh: strong SFT steps x WSPO (learning rate, steps) x gamma over the same
phase-one shards, each cell evaluated on the held-out pairs like the main job.

    python -m wspo.embedded.grid [GRID_DIR] [--pipeline_dir DIR]

Reads GRID_DIR/sft-<steps>/eval/ (the `wspo-eval` summaries and answers of each strong SFT model and
of its WSPO cells `wspo_lr<lr>_steps<n>_gamma<g>`) and the weak side of the main job's folder
(--pipeline_dir, default outputs/pipeline: weak SFT's held-out NLL, weak DPO's signal). Writes
GRID_DIR/grid.json and GRID_DIR/grid.md and prints the markdown table. Per cell, besides the main
job's numbers (signal, accuracy, held-out NLL, repetition): `signal_gain` (over its strong SFT
model), `nll_ratio` (to its strong SFT model's), `signal_anywhere` (share of answers that contain the
closing sentence anywhere, not only at the end) and `unfinished` (share of answers cut at
max_new_tokens), the two numbers that tell an answer that lost the signal from one that kept saying
it but did not stop.

`weak_reward` describes the shards' rewards themselves (`reward_anatomy`): how large the weak reward
is on the token where the closing sentence starts (where an answer decides to show the signal) and
on every other token, and what share of WSPO's loss at its start comes from that one token.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from wspo.embedded.report import _entry, _load
from wspo.embedded.sample import CLOSING

CELL = re.compile(r"wspo_lr([0-9.e-]+)_steps(\d+)_gamma([0-9.]+)")


def _answers_stats(eval_dir: Path, name: str) -> tuple[float | None, float | None]:
    answers = _load(eval_dir / f"answers-{name}.json")
    generated = _load(eval_dir / f"generate-{name}.json")
    anywhere = sum(CLOSING in a["output"] for a in answers) / len(answers) if answers else None
    unfinished = generated["hit_max_new_tokens"] / generated["outputs"] if generated else None
    return anywhere, unfinished


def reward_anatomy(shards_dir: Path) -> dict:
    """The weak rewards of the shards' chosen responses, split at the token where the closing
    sentence starts (the first token whose text reaches into it): that token's reward, every other
    token's, and the share of the WSPO loss at its start (policy = reference, so each sequence's
    term is its mean squared reward) that the closing sentence's first token carries."""
    import numpy as np

    from wspo.shards.store import ShardSet

    table = ShardSet.open(shards_dir).read_table(columns=["response", "token_end", "reward"]).to_pydict()
    first, others, first_share, total_share = [], [], 0.0, 0.0
    for response, ends, rewards in zip(table["response"], table["token_end"], table["reward"]):
        start = response.rfind(CLOSING)
        reaching = [i for i, end in enumerate(ends) if end > start]
        if start < 0 or not reaching:  # a response cut before its closing sentence
            continue
        rewards = np.asarray(rewards, dtype=np.float64)
        b = reaching[0]
        first.append(rewards[b])
        others.extend(np.delete(rewards, b))
        first_share += rewards[b] ** 2 / len(rewards)
        total_share += float(np.sum(rewards**2)) / len(rewards)
    first, others = np.asarray(first), np.asarray(others)
    return {"rows": len(first), "closing_first_token_mean": float(first.mean()), "closing_first_token_std": float(first.std()),
            "other_tokens_mean": float(others.mean()), "other_tokens_std": float(others.std()),
            "other_tokens_abs_mean": float(np.abs(others).mean()),
            "other_tokens": len(others), "closing_first_token_share_of_initial_loss": float(first_share / total_share)}


def _ratio(a, b):
    return None if a is None or b is None else a / b


def build_grid(grid_dir: Path, pipeline_dir: Path) -> dict:
    weak_rewards = _load(pipeline_dir / "eval" / "rewards-weak_dpo.json")
    weak_generated = _load(pipeline_dir / "eval" / "generate-weak_dpo.json")
    weak = {"weak_sft_nll": weak_rewards["reference_nll_per_token"] if weak_rewards else None,
            "weak_dpo_signal": weak_generated["preference_signal_share"] if weak_generated else None}
    rows = []
    for sft_dir in sorted(grid_dir.glob("sft-*/eval"), key=lambda p: int(p.parent.name.split("-")[1])):
        sft_steps = int(sft_dir.parent.name.split("-")[1])
        sft = _entry(sft_dir, "strong_sft", nll_from=None)
        sft_anywhere, sft_unfinished = _answers_stats(sft_dir, "strong_sft")
        for rewards_file in sorted(sft_dir.glob("rewards-wspo_*.json")):
            name = rewards_file.stem.removeprefix("rewards-")
            if not (m := CELL.fullmatch(name)):
                continue
            cell = _entry(sft_dir, name, nll_from=None)
            sft_nll = _load(rewards_file)["reference_nll_per_token"]
            anywhere, unfinished = _answers_stats(sft_dir, name)
            gain = None if cell["signal"] is None or sft["signal"] is None else cell["signal"] - sft["signal"]
            row = {"strong_sft_steps": sft_steps, "learning_rate": float(m.group(1)), "wspo_steps": int(m.group(2)),
                   "gamma": float(m.group(3)),
                   "strong_sft_signal": sft["signal"], "strong_sft_nll": sft_nll,
                   "strong_sft_nll_vs_weak_sft": _ratio(sft_nll, weak["weak_sft_nll"]),
                   "strong_sft_repetition": sft["repetition"], "strong_sft_signal_anywhere": sft_anywhere,
                   "strong_sft_unfinished": sft_unfinished,
                   "signal": cell["signal"], "signal_gain": gain, "accuracy": cell["accuracy"], "margin": cell["margin"],
                   "heldout_nll": cell["heldout_nll"], "nll_ratio": _ratio(cell["heldout_nll"], sft_nll),
                   "repetition": cell["repetition"], "signal_anywhere": anywhere, "unfinished": unfinished}
            row["goals_met"] = _goals_met(row)
            rows.append(row)
    rows.sort(key=lambda r: (r["strong_sft_steps"], -r["learning_rate"], r["wspo_steps"], r["gamma"]))
    shards = pipeline_dir / "shards" / "wspo"
    anatomy = reward_anatomy(shards) if (shards / "manifest.json").exists() else None
    return {"grid_dir": str(grid_dir), "pipeline_dir": str(pipeline_dir), **weak, "weak_reward": anatomy, "cells": rows}


def _goals_met(row: dict) -> bool | None:
    """All three goals of the paper's proportions: strong SFT NLL <= 0.9x weak SFT's, signal gain
    >= 0.2 over strong SFT, held-out NLL <= 1.10x strong SFT's. None when a number is missing."""
    values = (row["strong_sft_nll_vs_weak_sft"], row["signal_gain"], row["nll_ratio"])
    if any(v is None for v in values):
        return None
    return values[0] <= 0.9 and values[1] >= 0.2 - 1e-9 and values[2] <= 1.10


def markdown(grid: dict) -> str:
    def f(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [f"weak SFT held-out NLL {f(grid['weak_sft_nll'], '.3f')}, weak DPO signal {f(grid['weak_dpo_signal'], '.2f')}",
             ""]
    if (w := grid["weak_reward"]) is not None:
        lines += [f"weak reward per token ({w['rows']} chosen responses): {w['closing_first_token_mean']:+.3f} "
                  f"(std {w['closing_first_token_std']:.3f}) on the token where the closing sentence starts, "
                  f"{w['other_tokens_mean']:+.4f} (std {w['other_tokens_std']:.3f}) on every other token; "
                  f"that one token is {w['closing_first_token_share_of_initial_loss']:.0%} of the WSPO loss at its start", ""]
    lines += ["| strong SFT steps | SFT NLL (x weak) | SFT signal | SFT unfinished | SFT rep. | WSPO lr | steps | gamma | signal | gain "
             "| anywhere | unfinished | accuracy | NLL (x SFT) | rep. | goals |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|:---:|"]
    for r in grid["cells"]:
        met = {None: "-", True: "met", False: "no"}[r["goals_met"]]
        lines.append(f"| {r['strong_sft_steps']} | {f(r['strong_sft_nll'], '.3f')} ({f(r['strong_sft_nll_vs_weak_sft'], '.2f')}x) "
                     f"| {f(r['strong_sft_signal'], '.2f')} | {f(r['strong_sft_unfinished'], '.2f')} | {f(r['strong_sft_repetition'], '.2f')} | {r['learning_rate']:.0e} "
                     f"| {r['wspo_steps']} | {r['gamma']:g} | {f(r['signal'], '.2f')} | {f(r['signal_gain'], '+.2f')} "
                     f"| {f(r['signal_anywhere'], '.2f')} | {f(r['unfinished'], '.2f')} | {f(r['accuracy'], '.2f')} "
                     f"| {f(r['heldout_nll'], '.3f')} ({f(r['nll_ratio'], '.3f')}x) | {f(r['repetition'], '.2f')} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wspo.embedded.grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid_dir", nargs="?", default="outputs/grid", type=Path)
    parser.add_argument("--pipeline_dir", type=Path, default=Path("outputs/pipeline"),
                        help="the main job's folder, for the weak side (default outputs/pipeline)")
    args = parser.parse_args(argv)
    if not args.grid_dir.is_dir():
        parser.error(f"grid_dir {args.grid_dir} is not a folder")
    grid = build_grid(args.grid_dir, args.pipeline_dir)
    (args.grid_dir / "grid.json").write_text(json.dumps(grid, indent=2) + "\n")
    table = markdown(grid)
    (args.grid_dir / "grid.md").write_text(table)
    print(table)
    print(f"wrote {args.grid_dir / 'grid.json'} and {args.grid_dir / 'grid.md'}")


if __name__ == "__main__":
    main()
