"""The table at the end of the main job: how each model of the miniature pipeline does on the
held-out pairs of the bundled sample.

    python -m wspo.embedded.report outputs/pipeline/eval

Reads the summaries `wspo-eval` wrote there (`rewards-<model>.json`, `generate-<model>.json`) and
prints, per model, the held-out preference accuracy and mean margin of its implicit reward (its
log-ratio to its own SFT model, summed over the response) and the share of its greedy answers that
show the bundled preference signal (ending with "I hope this helps!").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (file stem, what it is, its reference)
ROWS = [
    ("weak_sft", "weak SFT", None),
    ("weak_dpo", "weak DPO", "weak SFT"),
    ("weak_expo", "weak ExPO (alpha 0.3)", "weak SFT"),
    ("strong_sft", "strong SFT", None),
    ("strong_wspo", "strong WSPO (gamma 0.1)", "strong SFT"),
    ("strong_wspo_g1", "strong WSPO (gamma 1.0)", "strong SFT"),
]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def table(eval_dir: Path) -> str:
    lines = [
        f"{'model':<24}{'vs':<12}{'pairs':>6}{'accuracy':>10}{'margin':>9}{'signal':>8}",
        "-" * 69,
    ]
    found = {}
    for stem, name, reference in ROWS:
        rewards = load(eval_dir / f"rewards-{stem}.json")
        generated = load(eval_dir / f"generate-{stem}.json")
        found[stem] = rewards
        pairs = f"{rewards['pairs']:>6}" if rewards else f"{'':>6}"
        accuracy = f"{rewards['accuracy']:>10.3f}" if rewards else f"{'-':>10}"
        margin = f"{rewards['margin_mean']:>+9.2f}" if rewards else f"{'-':>9}"
        signal = f"{generated['preference_signal_share']:>8.2f}" if generated else f"{'-':>8}"
        lines.append(f"{name:<24}{reference or '-':<12}{pairs}{accuracy}{margin}{signal}")
    wspo, dpo = found.get("strong_wspo"), found.get("weak_dpo")
    if wspo and dpo:
        lines.append("")
        lines.append(
            f"headline: strong WSPO's (gamma 0.1) held-out accuracy {wspo['accuracy']:.3f} vs chance 0.500 and weak DPO "
            f"{dpo['accuracy']:.3f} ({wspo['pairs']} held-out pairs)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/pipeline/eval")))
