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
  repetition   share of repeated word 4-grams in its greedy answers (`answers-<model>.json`), see
               `repeated_ngram_share`: 0 when no answer repeats itself, near 1 for a loop

`strong_wspo` is WSPO at gamma 0.1 (the paper's); `strong_wspo_gamma_<g>` are the sweep over the
same shards (the gamma 0.1 entry is `strong_wspo` again). A file that is missing gives nulls.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
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


def _load(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def repeated_ngram_share(texts: list[str], n: int = 4) -> float | None:
    """Share of the word n-grams of the answers that repeat an earlier n-gram of the same answer,
    pooled over all answers (sum of repeats / sum of n-grams). Words are whitespace-separated.
    `A b c d. A b c d.` has 5 4-grams of which 1 is a repeat: 0.2. None when no answer has n words.
    Greedy answers that loop on their closing sentence score high; the signal check cannot see it."""
    repeats = total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        repeats += len(grams) - len(set(grams))
        total += len(grams)
    return repeats / total if total else None


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
    answers = _load(eval_dir / f"answers-{stem}.json")
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
        "repetition": repeated_ngram_share([a["output"] for a in answers]) if answers else None,
    }


def build_report(eval_dir: Path, seed_dirs: list[Path] = ()) -> dict:
    """The report of one run's EVAL_DIR; `seed_dirs` are the eval folders of reruns with other seeds
    (scripts/seeds.sh): each model then also gets `seeds`, the mean and spread of its numbers over
    the runs that hold its files (the main run first)."""
    models = _models(eval_dir)
    if seed_dirs:
        reruns = [(d, _models(d)) for d in seed_dirs]
        for name, model in models.items():
            # A rerun counts for the models it evaluated itself (seeds.sh does not regenerate the
            # SFT models' answers; their NLL in a rerun's folder is the same model's again).
            stem = "strong_wspo" if name == f"strong_wspo_gamma_{PAPER_GAMMA:g}" else name
            model["seeds"] = seed_spread([model] + [r[name] for d, r in reruns if name in r and _evaluated(d, stem)])
    report = {"eval_dir": str(eval_dir), "paper_gamma": PAPER_GAMMA, "models": models, "goals": goals(models)}
    if seed_dirs:
        report["seed_dirs"] = [str(d) for d in seed_dirs]
    return report


def _evaluated(eval_dir: Path, stem: str) -> bool:
    return (eval_dir / f"generate-{stem}.json").exists() or (eval_dir / f"rewards-{stem}.json").exists()


def _models(eval_dir: Path) -> dict:
    models = {}
    for stem, label, nll_from in MODELS:
        models[stem] = {"label": label, "reference": REFERENCE_OF.get(stem), **_entry(eval_dir, stem, nll_from)}
    for text, gamma in sweep_gammas(eval_dir).items():
        stem = "strong_wspo" if gamma == PAPER_GAMMA else f"strong_wspo_gamma_{text}"
        models[f"strong_wspo_gamma_{text}"] = {"label": f"strong WSPO (gamma {text})", "reference": "strong SFT",
                                               "gamma": gamma, **_entry(eval_dir, stem, None)}
    models["strong_wspo"]["gamma"] = PAPER_GAMMA
    return models


SPREAD_KEYS = ("signal", "accuracy", "heldout_nll", "repetition")


def seed_spread(runs: list[dict]) -> dict:
    """Per number of SPREAD_KEYS: the values of the runs that have it, their mean and their sample
    standard deviation (`std`, null with fewer than two values). `runs` counts the runs that
    evaluated the model at all: a model that seeds.sh does not retrain (the SFT and weak models)
    has one run, and its spread is null, not zero."""
    present = [r for r in runs if any(r[k] is not None for k in SPREAD_KEYS)]
    spread = {"runs": len(present)}
    for key in SPREAD_KEYS:
        values = [r[key] for r in present if r[key] is not None]
        spread[key] = {"values": values, "mean": statistics.fmean(values) if values else None,
                       "std": statistics.stdev(values) if len(values) > 1 else None}
    return spread


def goals(models: dict) -> dict:
    """The main job's goals (docs/main-job.md), each True/False, or None when a number is missing:
    the paper's proportions (a strong SFT model more fluent than the weak one, a weak DPO model that
    shows the signal more often than weak SFT) and what WSPO at gamma 0.1 should do from there."""
    wspo, sft, dpo = models["strong_wspo"], models["strong_sft"], models["weak_dpo"]
    weak_sft = models["weak_sft"]

    def check(*values):
        return None if any(v is None for v in values) else True

    return {
        "strong_sft_nll_at_most_0.9x_weak_sft": check(sft["heldout_nll"], weak_sft["heldout_nll"])
        and sft["heldout_nll"] <= 0.9 * weak_sft["heldout_nll"],
        "weak_dpo_signal_above_weak_sft": check(dpo["signal"], weak_sft["signal"]) and dpo["signal"] > weak_sft["signal"],
        # 1e-9: shares of 100 answers are exact hundredths, whose float difference may fall just short
        "signal_gain_over_strong_sft_at_least_0.2": check(wspo["signal"], sft["signal"])
        and wspo["signal"] - sft["signal"] >= 0.2 - 1e-9,
        "accuracy_at_least_0.9": check(wspo["accuracy"]) and wspo["accuracy"] >= 0.9,
        "heldout_nll_within_1.10x_of_strong_sft": check(wspo["heldout_nll"], sft["heldout_nll"])
        and wspo["heldout_nll"] <= 1.10 * sft["heldout_nll"],
        "stretch_signal_at_least_weak_dpo": check(wspo["signal"], dpo["signal"]) and wspo["signal"] >= dpo["signal"],
    }


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{spec[0] if spec[0] == '+' else ''}{width}{spec.lstrip('+')}}"


def _rows(report: dict) -> list[str]:
    """The models in table order; the sweep's gamma 0.1 entry is strong_wspo again: listed once."""
    return [name for name, _, _ in MODELS] + [n for n, m in report["models"].items()
                                              if n.startswith("strong_wspo_gamma_") and m["gamma"] != PAPER_GAMMA]


def _mean_std(spread: dict, spec: str) -> str:
    if spread["mean"] is None:
        return "-"
    return f"{spread['mean']:{spec}}" + ("" if spread["std"] is None else f" ± {spread['std']:{spec}}")


def table(report: dict) -> str:
    lines = [f"{'model':<26}{'vs':<12}{'pairs':>6}{'accuracy':>10}{'margin':>9}{'signal':>8}{'NLL/tok':>9}{'rep4':>7}", "-" * 87]
    for name in _rows(report):
        m = report["models"][name]
        lines.append(f"{m['label']:<26}{m['reference'] or '-':<12}{_fmt(m['pairs'], 'd', 6)}{_fmt(m['accuracy'], '.3f', 10)}"
                     f"{_fmt(m['margin'], '+.2f', 9)}{_fmt(m['signal'], '.2f', 8)}{_fmt(m['heldout_nll'], '.3f', 9)}"
                     f"{_fmt(m['repetition'], '.2f', 7)}")
    if "seed_dirs" in report:
        lines += ["", f"over seeds (the run above and {len(report['seed_dirs'])} rerun(s) of phase two; mean ± sample std)",
                  f"{'model':<26}{'runs':>5}{'signal':>15}{'accuracy':>15}{'NLL/tok':>17}{'rep4':>15}", "-" * 93]
        for name in _rows(report):
            m = report["models"][name]
            spread = m["seeds"]
            lines.append(f"{m['label']:<26}{spread['runs']:>5}{_mean_std(spread['signal'], '.2f'):>15}"
                         f"{_mean_std(spread['accuracy'], '.3f'):>15}{_mean_std(spread['heldout_nll'], '.3f'):>17}"
                         f"{_mean_std(spread['repetition'], '.2f'):>15}")
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

    # Left: per model, the signal rate, the held-out accuracy and the repetition side by side. With
    # seeds, a bar is the mean over the runs, its whisker the sample std, the dots the runs.
    def value(model, key):
        return model["seeds"][key]["mean"] if "seeds" in model else model[key]

    width = 0.27
    xs = range(len(names))
    for offset, key, color, label in ((-width, "signal", "tab:orange", "signal rate of greedy answers"),
                                      (0, "accuracy", "tab:blue", "held-out accuracy (vs its SFT model)"),
                                      (width, "repetition", "tab:grey", "repeated 4-grams in greedy answers")):
        values = [value(models[n], key) for n in names]
        spreads = [models[n]["seeds"][key]["std"] if "seeds" in models[n] else None for n in names]
        positions = [x + offset for x in xs]
        bars = left.bar(positions, [v or 0 for v in values], width, color=color, label=label,
                        yerr=[s or 0 for s in spreads], capsize=3 if any(spreads) else 0)
        for n, position in zip(names, positions):
            runs = models[n]["seeds"][key]["values"] if "seeds" in models[n] else []
            if len(runs) > 1:
                left.plot([position] * len(runs), runs, ".", color="black", markersize=3)
        for bar, v, spread in zip(bars, values, spreads):
            text = "n/a\n(no ref.)" if v is None else f"{v:.2f}" + (f"\n±{spread:.2f}" if spread else "")
            left.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + (spread or 0)),
                          ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    left.set_xticks(list(xs), [models[n]["label"].replace(" (", "\n(") for n in names], fontsize=9)
    left.axvline(2.5, color="grey", linewidth=0.8)
    left.set_ylim(0, 1.25)
    left.set_ylabel("share of held-out prompts / pairs")
    left.set_title("Each model on the 100 held-out pairs" + (" (mean of the seeds)" if "seed_dirs" in report else ""))
    left.legend(loc="upper left", fontsize=8)

    # Right: the sweep over gamma, all from the same shards.
    sweep = sorted((m for n, m in models.items() if n.startswith("strong_wspo_gamma_")), key=lambda m: m["gamma"])
    gammas = [m["gamma"] for m in sweep]

    def series(key):
        return [float("nan") if value(m, key) is None else value(m, key) for m in sweep]

    def spread(key):
        return [(m["seeds"][key]["std"] or 0) if "seeds" in m else 0 for m in sweep]

    right.errorbar(gammas, series("signal"), yerr=spread("signal"), fmt="o-", color="tab:orange", capsize=3,
                   label="strong WSPO signal rate")
    right.errorbar(gammas, series("accuracy"), yerr=spread("accuracy"), fmt="s-", color="tab:blue", capsize=3,
                   label="strong WSPO accuracy")
    right.plot(gammas, series("repetition"), "x:", color="tab:grey", label="strong WSPO repeated 4-grams")
    sft_nll = models["strong_sft"]["heldout_nll"]
    if sft_nll:
        right.plot(gammas, [v / sft_nll for v in series("heldout_nll")], "^--", color="tab:green",
                   label="held-out NLL / strong SFT's (1 = as fluent)")
    for key, color, label in (("strong_sft", "tab:orange", "strong SFT signal"), ("weak_dpo", "tab:red", "weak DPO signal")):
        if value(models[key], "signal") is not None:
            right.axhline(value(models[key], "signal"), color=color, linestyle=":", linewidth=1.2, label=label)
    right.axvline(report["paper_gamma"], color="grey", linewidth=0.8)
    right.annotate("paper's gamma", (report["paper_gamma"], 0.02), fontsize=8, color="grey", xytext=(3, 0),
                   textcoords="offset points")
    right.set_xscale("log")
    right.set_xticks(gammas, [f"{g:g}" for g in gammas])
    right.minorticks_off()
    right.set_ylim(0, max([1.15, *(v / sft_nll + 0.1 for v in series("heldout_nll") if sft_nll and v == v)]))
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
    parser.add_argument("--seeds", type=Path, nargs="*", default=[], metavar="SEED_EVAL_DIR",
                        help="eval folders of reruns of phase two with other seeds (scripts/seeds.sh): adds mean and spread")
    args = parser.parse_args(argv)
    for folder, name in [(args.eval_dir, "eval_dir")] + [(d, "--seeds") for d in args.seeds]:
        if not folder.is_dir():
            parser.error(f"{name} {folder} is not a folder")
    out = args.output_dir or args.eval_dir.parent
    report = build_report(args.eval_dir, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    figure(report, out / "report.png")
    print(table(report))
    print(f"\nwrote {out / 'report.json'} and {out / 'report.png'}")


if __name__ == "__main__":
    main()
