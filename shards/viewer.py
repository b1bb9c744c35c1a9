"""`wspo-shards show SHARDS --html OUT.html`: a page to judge a weak model's reward by eye.

Each shown response has every token coloured by its reward (red below zero, blue above, white at
zero; the scale is clipped at the 99th percentile of |reward|), with the reward and each scorer's
log-prob on hover (and, for sets with top-k columns, each top-k scorer's five most likely
alternatives with their probabilities); the rows with the highest reward sums come first, then the lowest; a histogram
of the per-token rewards of the whole set sits on top. The page is one self-contained file: no
script, no network. Memory stays bounded: only `reward_sum` of every row and one file at a time
are read.
"""

from __future__ import annotations

import html
import json

import numpy as np

from .schema import has_reward, logp_column
from .storage import read_parquet
from .store import ShardSet, list_arrays
from .topk import alternatives, decode_topk, ids_column, logps_column


def _token_text(tokenizer_name: str):
    """id -> text for the alternatives on hover: the shards' tokenizer when it is a local folder
    (never a download), else the bare id."""
    from pathlib import Path

    if Path(str(tokenizer_name)).is_dir():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_name))
            return lambda i: repr(tokenizer.decode([i]))
        except (OSError, ValueError):
            pass
    return lambda i: f"id {i}"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
.meta { color: #555; font-size: 0.9em; }
.row { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin: 0.8em 0; }
.head { font-size: 0.85em; color: #555; margin-bottom: 0.4em; }
.prompt { font-size: 0.9em; color: #333; background: #f6f6f6; padding: 0.4em; border-radius: 4px; white-space: pre-wrap; }
.response { font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap; line-height: 1.7; margin-top: 0.5em; }
.t { border-radius: 2px; } .eot { font-style: italic; color: #777; }
.legend span { display: inline-block; width: 3.6em; text-align: center; font-size: 0.8em; }
"""


def _colour(value: float, scale: float) -> str:
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if x < 0:  # white -> red
        return f"rgba(214, 39, 40, {abs(x) * 0.85:.3f})"
    return f"rgba(31, 119, 180, {x * 0.85:.3f})"


def _histogram_svg(counts: np.ndarray, edges: np.ndarray, width: int = 900, height: int = 180) -> str:
    top = max(int(counts.max()), 1)
    bar = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 30) * c / top
        centre = (edges[i] + edges[i + 1]) / 2
        fill = "#d62728" if centre < 0 else "#1f77b4"
        bars.append(f'<rect x="{i * bar:.1f}" y="{height - 20 - h:.1f}" width="{bar * 0.9:.1f}" height="{h:.1f}" '
                    f'fill="{fill}"><title>[{edges[i]:+.3f}, {edges[i + 1]:+.3f}): {int(c)} tokens</title></rect>')
    labels = "".join(f'<text x="{k * width / 4:.0f}" y="{height - 4}" font-size="11" text-anchor="{a}">{edges[0] + k * (edges[-1] - edges[0]) / 4:+.2f}</text>'
                     for k, a in zip(range(5), ("start", "middle", "middle", "middle", "end")))
    return f'<svg class="histogram" width="{width}" height="{height}" role="img">{"".join(bars)}{labels}</svg>'


def render(shards: ShardSet, n: int = 20) -> str:
    value_column = "reward" if has_reward(shards.scorer_names) else logp_column(shards.scorer_names[0])
    logp_columns = [logp_column(s) for s in shards.scorer_names]
    paths = [shards.root / f["path"] for f in shards.files]
    # 1. Which rows: every row's sum, then the n highest and n lowest.
    if value_column == "reward":
        sums = np.concatenate([read_parquet(p, columns=["reward_sum"])["reward_sum"].to_numpy() for p in paths])
    else:
        sums = np.concatenate([np.array([a.sum() for a in list_arrays(read_parquet(p, columns=[value_column])[value_column])])
                               for p in paths])
    order = np.argsort(-sums, kind="stable")
    chosen = list(order[:n]) + [i for i in order[::-1][:n] if i not in set(order[:n])]
    sections = {"highest": [int(i) for i in order[:n]], "lowest": [int(i) for i in chosen[min(n, len(order)):]]}
    # 2. The histogram of per-token values, one file at a time over fixed bins.
    stats = (shards.manifests[0].get("reward") or {}) if value_column == "reward" else {}
    low, high = stats.get("token_p01_p50_p99", [None, None, None])[0], stats.get("token_p01_p50_p99", [None, None, None])[2]
    if low is None:
        sample = np.concatenate(list_arrays(read_parquet(paths[0], columns=[value_column])[value_column]))
        low, high = float(np.quantile(sample, 0.01)), float(np.quantile(sample, 0.99))
    bound = max(abs(low), abs(high), 1e-6)
    edges = np.linspace(-bound if value_column == "reward" else low, bound if value_column == "reward" else high, 61)
    counts = np.zeros(60, dtype=np.int64)
    for p in paths:
        values = np.concatenate(list_arrays(read_parquet(p, columns=[value_column])[value_column]) or [np.zeros(0)])
        counts += np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    # 3. The rows themselves, read file by file.
    wanted = set(sections["highest"]) | set(sections["lowest"])
    rows, offset = {}, 0
    columns = ["id", "slot", "messages", "response", "token_start", "token_end", value_column] + [c for c in logp_columns if c != value_column]
    topk = shards.topk or {"scorers": []}
    columns += [c for s in topk["scorers"] for c in (ids_column(s), logps_column(s))]
    token_text = _token_text(shards.tokenizer["name"]) if topk["scorers"] else None
    for p, record in zip(paths, shards.files):
        local = [i - offset for i in wanted if offset <= i < offset + record["rows"]]
        if local:
            table = read_parquet(p, columns=columns).take(local)
            arrays = {c: list_arrays(table[c]) for c in columns if c.startswith(("logp_", "reward", "topk_"))}
            for k, i in enumerate(local):
                rows[offset + i] = {c: table[c][k].as_py() for c in ("id", "slot", "messages", "response", "token_start", "token_end")}
                rows[offset + i].update({c: arrays[c][k] for c in arrays})
        offset += record["rows"]

    def render_row(i: int) -> str:
        row = rows[i]
        messages = json.loads(row["messages"])
        prompt = messages[-1]["content"] if messages else ""
        top = {s: decode_topk(row[ids_column(s)], row[logps_column(s)], topk["k"], topk["encoding"]) for s in topk["scorers"]}
        spans = []
        for k, (a, b) in enumerate(zip(row["token_start"], row["token_end"])):
            value = float(row[value_column][k])
            lines = [f"{value_column} {value:+.4f}"] + [f"{c} {float(row[c][k]):.4f}" for c in logp_columns if c != value_column]
            for s, (ids, logps) in top.items():  # the top alternatives of each top-k scorer
                lines.append(f"{s} top {topk['k']}: " + ", ".join(f"{token_text(i)} {np.exp(lp):.3f}"
                                                                   for i, lp in alternatives(ids[k], logps[k])))
            tip = html.escape("\n".join(lines), quote=True).replace("\n", "&#10;")
            text = html.escape(row["response"][a:b]) if b > a else '<span class="eot">⏎ end of turn</span>'
            spans.append(f'<span class="t" style="background:{_colour(value, bound)}" title="{tip}">{text}</span>')
        total = float(np.asarray(row[value_column], np.float64).sum())
        return (f'<div class="row" data-id="{row["id"]}"><div class="head">{value_column} sum <b>{total:+.3f}</b> · '
                f'{len(spans)} tokens · {html.escape(row["slot"])} · id {row["id"][:16]}</div>'
                f'<div class="prompt">{html.escape(prompt[:600])}</div><div class="response">{"".join(spans)}</div></div>')

    tok = shards.tokenizer
    legend = "".join(f'<span style="background:{_colour(v * bound, bound)}">{v * bound:+.2f}</span>' for v in np.linspace(-1, 1, 9))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>wspo shards: ", html.escape(str(shards.root)),
        f"</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(str(shards.root))}</h1>",
        f'<p class="meta">{shards.num_rows:,} rows, {shards.num_tokens:,} response tokens; scorers '
        f'{", ".join(html.escape(s["name"] + " = " + str(s["model"])) for s in shards.scorers)}; tokenizer '
        f'{html.escape(str(tok["name"]))}. Colour: per-token {value_column} (hover a token for the numbers).</p>',
        f'<div class="legend">{legend}</div>',
        f"<h2>Per-token {value_column} over the whole set</h2>", _histogram_svg(counts, edges),
        f"<h2>Highest {value_column} sums</h2>", *(render_row(i) for i in sections["highest"]),
        f"<h2>Lowest {value_column} sums</h2>", *(render_row(i) for i in sections["lowest"]),
        "</body></html>",
    ]
    return "".join(parts)


def write_html(shards: ShardSet, out_path, n: int = 20) -> int:
    from pathlib import Path

    from .store import write_text

    page = render(shards, n)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(page, out)
    return page.count('<div class="row"')
