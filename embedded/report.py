"""The report at the end of the main job: how each model of the miniature pipeline does on the
held-out pairs of the bundled sample.

    python -m wspo.embedded.report [EVAL_DIR] [--output_dir DIR]

Reads the summaries `wspo-eval` wrote into EVAL_DIR (default `outputs/pipeline/eval`):
`rewards-<model>.json` and `generate-<model>.json`. Writes `report.json` and `report.png` into
DIR (default: EVAL_DIR's parent folder, `outputs/pipeline`) and prints the table. Per model:

  accuracy     share of held-out pairs whose chosen response gets the higher implicit reward (the
               model's summed log-ratio to its own SFT model); null for the SFT models, which have
               no reference of their own
  margin       mean implicit-reward difference, chosen - rejected, in nats (null for SFT models)
  signal       share of its greedy answers that end with the preference signal "I hope this helps!"
  heldout_nll  mean negative log-likelihood per token of the held-out chosen responses; for an SFT
               model it is read from the reference side of its aligned model's rewards file
               (weak SFT from weak DPO's, strong SFT from strong WSPO's)

`strong_wspo` is WSPO at gamma 0.1 (the paper's); `strong_wspo_gamma_<g>` are the sweep over the
same shards (the gamma 0.1 entry is `strong_wspo` again). A file that is missing gives nulls.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PAPER_GAMMA = 0.1

# (name in report.json, label, the model whose rewards file holds its NLL as the reference side)
MODELS = [
    ("weak_sft", "weak SFT", "weak_dpo"),
    ("weak_dpo", "weak DPO", None),
    ("weak_expo", "weak ExPO (alpha 0.3)", None),
    ("strong_sft", "strong SFT", "strong_wspo"),
    ("strong_wspo", f"strong WSPO (gamma {PAPER_GAMMA:g})", None),
]
REFERENCE_OF = {"weak_dpo": "weak SFT", "weak_expo": "weak SFT", "strong_wspo": "strong SFT"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def sweep_gammas(eval_dir: Path) -> dict[str, float]:
    """gamma as written in the sweep's file names (`rewards-strong_wspo_gamma_0.5.json`) -> its
    value, plus the paper's gamma (that run is strong_wspo), sorted by value."""
    found = {m.group(1): float(m.group(1)) for p in eval_dir.glob("*-strong_wspo_gamma_*.json")
             if (m := re.fullmatch(r"(?:rewards|generate)-strong_wspo_gamma_([0-9.]+)\.json", p.name))}
    found.setdefault(f"{PAPER_GAMMA:g}", PAPER_GAMMA)
    return dict(sorted(found.items(), key=lambda item: item[1]))


def _entry(eval_dir: Path, stem: str, nll_from: str | None) -> dict:
    rewards = _load(eval_dir / f"rewards-{stem}.json")
    generated = _load(eval_dir / f"generate-{stem}.json")
    if nll_from is not None:  # an SFT model: no reference of its own; its NLL is another file's reference side
        holder = _load(eval_dir / f"rewards-{nll_from}.json")
        nll = holder["reference_nll_per_token"] if holder else None
        accuracy = margin = pairs = None
    else:
        nll = rewards["policy_nll_per_token"] if rewards else None
        accuracy = rewards["accuracy"] if rewards else None
        margin = rewards["margin_mean"] if rewards else None
        pairs = rewards["pairs"] if rewards else None
    return {
        "accuracy": accuracy,
        "margin": margin,
        "signal": generated["preference_signal_share"] if generated else None,
        "heldout_nll": nll,
        "pairs": pairs,
        "answers": generated["outputs"] if generated else None,
    }


def build_report(eval_dir: Path) -> dict:
    models = {}
    for stem, label, nll_from in MODELS:
        models[stem] = {"label": label, "reference": REFERENCE_OF.get(stem), **_entry(eval_dir, stem, nll_from)}
    for text, gamma in sweep_gammas(eval_dir).items():
        stem = "strong_wspo" if gamma == PAPER_GAMMA else f"strong_wspo_gamma_{text}"
        models[f"strong_wspo_gamma_{text}"] = {"label": f"strong WSPO (gamma {text})", "reference": "strong SFT",
                                               "gamma": gamma, **_entry(eval_dir, stem, None)}
    models["strong_wspo"]["gamma"] = PAPER_GAMMA
    return {"eval_dir": str(eval_dir), "paper_gamma": PAPER_GAMMA, "models": models, "goals": goals(models)}


def goals(models: dict) -> dict:
    """The main job's goals (docs/main-job.md), each True/False, or None when a number is missing."""
    wspo, sft, dpo = models["strong_wspo"], models["strong_sft"], models["weak_dpo"]

    def check(*values):
        return None if any(v is None for v in values) else True

    return {
        "signal_gain_over_strong_sft_at_least_0.2": check(wspo["signal"], sft["signal"]) and wspo["signal"] - sft["signal"] >= 0.2,
        "accuracy_at_least_0.9": check(wspo["accuracy"]) and wspo["accuracy"] >= 0.9,
        "heldout_nll_within_1.25x_of_strong_sft": check(wspo["heldout_nll"], sft["heldout_nll"])
        and wspo["heldout_nll"] <= 1.25 * sft["heldout_nll"],
        "stretch_signal_at_least_weak_dpo": check(wspo["signal"], dpo["signal"]) and wspo["signal"] >= dpo["signal"],
    }


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{spec[0] if spec[0] == '+' else ''}{width}{spec.lstrip('+')}}"


def table(report: dict) -> str:
    lines = [f"{'model':<26}{'vs':<12}{'pairs':>6}{'accuracy':>10}{'margin':>9}{'signal':>8}{'NLL/tok':>9}", "-" * 80]
    # The sweep's gamma 0.1 row is strong_wspo again: listed once.
    rows = [name for name, _, _ in MODELS] + [n for n, m in report["models"].items()
                                              if n.startswith("strong_wspo_gamma_") and m["gamma"] != PAPER_GAMMA]
    for name in rows:
        m = report["models"][name]
        lines.append(f"{m['label']:<26}{m['reference'] or '-':<12}{_fmt(m['pairs'], 'd', 6)}{_fmt(m['accuracy'], '.3f', 10)}"
                     f"{_fmt(m['margin'], '+.2f', 9)}{_fmt(m['signal'], '.2f', 8)}{_fmt(m['heldout_nll'], '.3f', 9)}")
    lines.append("")
    for goal, met in report["goals"].items():
        lines.append(f"goal {goal}: {'-' if met is None else ('met' if met else 'NOT met')}")
    return "\n".join(lines)


def figure(report: dict, path: Path) -> None:
    """Two panels: signal rate and accuracy of each model; the gamma sweep of strong WSPO."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    models = report["models"]
    names = [name for name, _, _ in MODELS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.25, 1]})

    # Left: per model, the signal rate and the held-out accuracy side by side.
    width = 0.38
    xs = range(len(names))
    for offset, key, color, label in ((-width / 2, "signal", "tab:orange", "signal rate of greedy answers"),
                                      (width / 2, "accuracy", "tab:blue", "held-out accuracy (vs its SFT model)")):
        values = [models[n][key] for n in names]
        bars = left.bar([x + offset for x in xs], [v or 0 for v in values], width, color=color, label=label)
        for bar, v in zip(bars, values):
            left.annotate("n/a\n(no ref.)" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    left.set_xticks(list(xs), [models[n]["label"].replace(" (", "\n(") for n in names], fontsize=9)
    left.axvline(2.5, color="grey", linewidth=0.8)
    left.set_ylim(0, 1.15)
    left.set_ylabel("share of held-out prompts / pairs")
    left.set_title("Each model on the 100 held-out pairs")
    left.legend(loc="upper left", fontsize=8)

    # Right: the sweep over gamma, all from the same shards.
    sweep = sorted((m for n, m in models.items() if n.startswith("strong_wspo_gamma_")), key=lambda m: m["gamma"])
    gammas = [m["gamma"] for m in sweep]

    def series(key):
        return [float("nan") if m[key] is None else m[key] for m in sweep]

    right.plot(gammas, series("signal"), "o-", color="tab:orange", label="strong WSPO signal rate")
    right.plot(gammas, series("accuracy"), "s-", color="tab:blue", label="strong WSPO accuracy")
    sft_nll = models["strong_sft"]["heldout_nll"]
    if sft_nll:
        right.plot(gammas, [v / sft_nll for v in series("heldout_nll")], "^--", color="tab:green",
                   label="held-out NLL / strong SFT's (1 = as fluent)")
    for key, color, label in (("strong_sft", "tab:orange", "strong SFT signal"), ("weak_dpo", "tab:red", "weak DPO signal")):
        if models[key]["signal"] is not None:
            right.axhline(models[key]["signal"], color=color, linestyle=":", linewidth=1.2, label=label)
    right.axvline(report["paper_gamma"], color="grey", linewidth=0.8)
    right.annotate("paper's gamma", (report["paper_gamma"], 0.02), fontsize=8, color="grey", xytext=(3, 0),
                   textcoords="offset points")
    right.set_xscale("log")
    right.set_xticks(gammas, [f"{g:g}" for g in gammas])
    right.minorticks_off()
    right.set_ylim(0, max(1.15, *(v / sft_nll + 0.1 for v in series("heldout_nll") if sft_nll and v == v)))
    right.set_xlabel("gamma (strong log-ratio matched to reward / gamma)")
    right.set_title("Strong WSPO: sweep of gamma over the same shards")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wspo.embedded.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", nargs="?", default="outputs/pipeline/eval", type=Path)
    parser.add_argument("--output_dir", type=Path, default=None, help="where report.json and report.png go (default: EVAL_DIR/..)")
    args = parser.parse_args(argv)
    if not args.eval_dir.is_dir():
        parser.error(f"eval_dir {args.eval_dir} is not a folder")
    out = args.output_dir or args.eval_dir.parent
    report = build_report(args.eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    figure(report, out / "report.png")
    print(table(report))
    print(f"\nwrote {out / 'report.json'} and {out / 'report.png'}")


if __name__ == "__main__":
    main()
