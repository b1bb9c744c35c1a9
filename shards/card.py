"""The dataset card (`README.md`) of a shard set: a Hugging Face dataset folder (DESIGN section 4).

Its YAML header tells `datasets.load_dataset(DIR)` (and the Hub) that the data are
`data/*.parquet`, one `train` split; its text says what scored the set and how to read it. Every
worker rewrites it, atomically, from the manifests present after writing its own, so the card of
a finished set describes every worker (`wspo-shards card DIR` rewrites it by hand).
"""

from __future__ import annotations

from .manifest import load_manifest, manifest_paths
from .schema import COLUMNS, PLAIN_FORMAT_VERSION
from .storage import shard_path
from .store import write_text

HEADER = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
tags:
- wspo
- weak-to-strong
- reward-shards
---
"""


def render_card(manifests: list[dict], total_workers: int) -> str:
    first = manifests[0]
    rows = sum(f["rows"] for m in manifests for f in m["files"])
    tokens = sum(f["tokens"] for m in manifests for f in m["files"])
    dataset = first["run_settings"]["dataset"]
    tok = first["tokenizer"]
    lines = [HEADER, "# wspo reward shards", "",
             f"Per-token log-probs (and WSPO rewards) scored by `wspo-precompute` (shard format version "
             f"{first.get('format_version', PLAIN_FORMAT_VERSION)}) on `{dataset['source']}` split `{dataset['split']}` ({dataset['format']} layout), "
             f"slots {', '.join(dataset['slots'])}.", "",
             f"- rows: {rows:,}; response tokens: {tokens:,}; workers: {len(manifests)} of {total_workers}"
             + ("" if len(manifests) == total_workers else " (unfinished: workers are still writing)"),
             f"- tokenizer: `{tok['name']}` (fingerprint `{tok['fingerprint'][:16]}`, end of turn `{tok['end_of_turn_token']}`, "
             f"max length {tok['max_length']})", "", "## Scorers", "", "| column | model | dtype | backend |", "|---|---|---|---|"]
    lines += [f"| `logp_{s['name']}` | `{s['model']}` | {s['dtype']} | {s['backend']} |" for s in first["scorers"]]
    topk = first.get("topk")
    if topk:
        lines += ["", "## Top-k log-probs (distillation)", "",
                  f"Columns `topk_ids_<scorer>` and `topk_logp_<scorer>` of {', '.join(f'`{s}`' for s in topk['scorers'])}: "
                  f"the {topk['k']} most likely token ids at every response position and their log-probs, encoding "
                  f"`{topk['encoding']}` ({topk['layout']}; largest log-prob error {topk['max_logp_error']:.3g} nats). "
                  "`wspo.shards.topk.decode_topk` decodes a row; `wspo-train --loss kd` distills from them."]
    lines += ["", "## Columns", "", "| column | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in COLUMNS.items()]
    reward = first.get("reward") if len(manifests) == 1 else None
    if reward:
        lines += ["", "## Reward", "",
                  f"Per token: mean {reward['token_mean']:+.4f}, std {reward['token_std']:.4f}, "
                  f"1/50/99th percentiles {', '.join(f'{q:+.3f}' for q in reward['token_p01_p50_p99'])}. "
                  f"Per response: mean {reward['sum_mean']:+.3f}, {100 * reward['positive_sum_fraction']:.1f}% positive."]
    lines += ["", "## Reading it", "", "```python",
              "import datasets; rows = datasets.load_dataset('DIR', split='train')",
              "import pandas as pd; df = pd.read_parquet('DIR/data')",
              "```", "",
              "`wspo-shards verify DIR` checks every file against the manifests; `wspo-train --shards DIR` trains from it.",
              "", "## Command", "", "```", first.get("command", "wspo-precompute ..."), "```", ""]
    return "\n".join(lines)


def write_card(root) -> None:
    root = shard_path(root)
    while True:
        paths = manifest_paths(root)
        manifests = [load_manifest(p) for p in paths if p.exists()]
        if not manifests:
            return
        write_text(render_card(manifests, manifests[0]["workers"]["num_workers"]), root / "README.md")
        # Workers finishing together: one may rename its card after another's that saw more
        # manifests. Each writes its manifest before its card, so rendering again until no
        # manifest appeared meanwhile leaves the last card with every manifest.
        if manifest_paths(root) == paths:
            return
