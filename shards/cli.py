"""`wspo-shards {info,verify,head,show,project} SHARDS`: look at a shard set without writing code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from wspo.args import SuggestingParser
from wspo.errors import WspoError

from .schema import COLUMNS, has_reward, logp_column
from .storage import read_parquet
from .store import ShardError, ShardSet, list_arrays, reward_statistics


def cmd_info(shards: ShardSet, args) -> int:
    m = shards.manifests[0]
    dataset = m["run_settings"]["dataset"]
    counts = [w["counts"] for w in shards.manifests]
    skipped: dict[str, int] = {}
    for c in counts:
        for reason, n in c["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    info = {
        "path": str(shards.root),
        "format_version": m["format_version"],
        "rows": shards.num_rows,
        "response_tokens": shards.num_tokens,
        "files": len(shards.files),
        "workers": len(shards.manifests),
        "dataset": f"{dataset['source']} [{dataset['split']}] ({dataset['format']}), slots {','.join(dataset['slots'])}",
        "skipped": skipped,
        "truncated": sum(c["truncated"] for c in counts),
        "tokenizer": {k: m["tokenizer"][k] for k in ("name", "fingerprint", "vocab_size", "end_of_turn_token", "max_length")},
        "scorers": [{k: s[k] for k in ("name", "model", "backend", "dtype")} for s in shards.scorers],
    }
    if shards.topk:  # format version 3: what the top-k columns cost per response token
        from .topk import column_bytes, ids_column, logps_column

        paths = [shards.root / f["path"] for f in shards.files]
        info["topk"] = {**{k: shards.topk[k] for k in ("k", "encoding", "scorers", "max_logp_error")},
                        "bytes_per_token": {s: round(column_bytes(paths, [ids_column(s), logps_column(s)]) / max(shards.num_tokens, 1), 1)
                                            for s in shards.topk["scorers"]}}
    if has_reward(shards.scorer_names):
        # One file at a time: the summary's memory does not grow with the set.
        stats = reward_statistics(read_parquet(shards.root / f["path"], columns=["reward", "reward_sum"]) for f in shards.files)
        if stats:
            info["reward"] = {k: [round(q, 4) for q in v] if isinstance(v, list) else v if isinstance(v, bool) else round(v, 6)
                              for k, v in stats.items()}
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def cmd_verify(shards: ShardSet, args) -> int:
    problems = shards.verify(checksums=not args.quick)
    if problems:
        print(f"{shards.root}: does not verify", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{shards.root}: OK ({len(shards.files)} files, {shards.num_rows} rows, {shards.num_tokens} tokens, "
          f"{len(shards.manifests)} worker(s))")
    return 0


def cmd_head(shards: ShardSet, args) -> int:
    columns = ["id", "slot", "messages", "response", "token_start", "token_end"]
    numeric = (["reward"] if has_reward(shards.scorer_names) else []) + [logp_column(s) for s in shards.scorer_names]
    table = shards.read_table(columns=columns + numeric).slice(0, args.n)
    arrays = {c: list_arrays(table[c]) for c in numeric}
    for i in range(table.num_rows):
        row = {c: table[c][i].as_py() for c in ("id", "slot", "messages", "response")}
        prompt = json.loads(row["messages"])[-1]["content"]
        print(f"== row {i} · {row['slot']} · id {row['id'][:16]}")
        print(f"   last prompt turn: {prompt[:100]!r}")
        print("   " + "  ".join(f"{c:>18}" for c in numeric) + "  token")
        starts, ends = table["token_start"][i].as_py(), table["token_end"][i].as_py()
        for k, (a, b) in enumerate(zip(starts[: args.tokens], ends[: args.tokens])):
            text = row["response"][a:b] if b > a else "<end-of-turn>"
            print("   " + "  ".join(f"{arrays[c][i][k]:>18.4f}" for c in numeric) + f"  {text!r}")
        if len(starts) > args.tokens:
            print(f"   ... {len(starts) - args.tokens} more tokens")
    return 0


def cmd_show(shards: ShardSet, args) -> int:
    from wspo.paths import check_output

    from .viewer import write_html

    shards.check()
    check_output(args.html, {"shards": str(shards.root)}, option="--html", is_file=True)
    shown = write_html(shards, args.html, n=args.rows)
    print(f"wrote {args.html}: {shown} rows (highest and lowest sums) and the per-token histogram")
    return 0


def cmd_project(shards: ShardSet, args) -> int:
    """How lossy reward projection onto another tokenizer is (DESIGN section 5), as JSON.

    Every row's response is re-tokenized alone with the given tokenizer (the rule of
    shards/tokenization.py, end-of-turn appended, not cut to max_length) and chunked against the
    stored spans. A truncated shard row is compared on the prefix it covers.
    """
    from transformers import AutoTokenizer

    from .projection import chunk_tokens, roundtrip_ok
    from .tokenization import ResponseTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as e:
        raise ShardError(f"--tokenizer {args.tokenizer}: cannot load it ({e})") from None
    rule = ResponseTokenizer(tokenizer, max_length=shards.tokenizer["max_length"],
                             max_prompt_length=shards.tokenizer["max_prompt_length"],
                             end_of_turn_token=args.end_of_turn_token,
                             rule_version=shards.tokenizer.get("rule_version", 1))
    # One vocabulary on both sides: ids name the same pieces, so identical pieces pair one to one.
    same_tokenizer = rule.matches(shards.tokenizer)
    table = shards.read_table(columns=["id", "response", "token_ids", "token_start", "token_end", "truncated"])
    weak_ids, weak_starts, weak_ends = (list_arrays(table[c]) for c in ("token_ids", "token_start", "token_end"))
    totals = dict(weak_tokens=0, strong_tokens=0, excluded_weak_tokens=0, excluded_strong_tokens=0,
                  chunks=0, strong_tokens_one_to_one=0, rows_not_round_tripping=0)
    longest = None
    for i, (row_id, response, truncated) in enumerate(zip(table["id"].to_pylist(), table["response"].to_pylist(),
                                                           table["truncated"].to_pylist())):
        strong_ids, strong_starts, strong_ends = rule.response_tokens(response)
        try:
            chunking = chunk_tokens(
                len(response), weak_starts[i], weak_ends[i], strong_starts, strong_ends,
                weak_has_end_of_turn=not truncated, strong_has_end_of_turn=True,
                weak_pieces=weak_ids[i].tolist() if same_tokenizer else None,
                strong_pieces=strong_ids if same_tokenizer else None,
            )
        except ValueError as e:
            raise ShardError(f"row {row_id}: {e}") from None
        weak_counts, strong_counts = chunking.weak_counts(), chunking.strong_counts()
        totals["weak_tokens"] += len(weak_starts[i])
        totals["strong_tokens"] += len(strong_ids)
        totals["excluded_weak_tokens"] += int((chunking.weak_chunk < 0).sum())
        totals["excluded_strong_tokens"] += int((chunking.strong_chunk < 0).sum())
        totals["chunks"] += chunking.num_chunks
        totals["strong_tokens_one_to_one"] += int(((weak_counts == 1) & (strong_counts == 1)).sum())
        totals["rows_not_round_tripping"] += not roundtrip_ok(tokenizer, response)
        if chunking.num_chunks:
            c = int(np.argmax(weak_counts + strong_counts))
            size = int(weak_counts[c] + strong_counts[c])
            if longest is None or size > longest["weak_tokens"] + longest["strong_tokens"]:
                longest = {"row_id": row_id, "weak_tokens": int(weak_counts[c]), "strong_tokens": int(strong_counts[c]),
                           "text": response[chunking.chunk_start[c]:chunking.chunk_end[c]]}
    included_weak = totals["weak_tokens"] - totals["excluded_weak_tokens"]
    included_strong = totals["strong_tokens"] - totals["excluded_strong_tokens"]
    chunks = max(totals["chunks"], 1)
    report = {
        "shards": str(shards.root),
        "tokenizer": args.tokenizer,
        "same_tokenizer": same_tokenizer,
        "rows": table.num_rows,
        **totals,
        "one_to_one_strong_share": round(totals["strong_tokens_one_to_one"] / max(included_strong, 1), 6),
        "mean_weak_tokens_per_chunk": round(included_weak / chunks, 4),
        "mean_strong_tokens_per_chunk": round(included_strong / chunks, 4),
        "longest_chunk": longest,
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _length_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'none', got {text!r}") from None


def cmd_export(shards: ShardSet, args) -> int:
    """`--format trl-dpo`: the (chosen, rejected) pairs with reference sums for TRL 1.16's
    DPOTrainer, as Parquet under OUT/data/ (`datasets.load_dataset(OUT, split="train")`)."""
    from wspo.paths import check_output

    from .store import DATA_DIR, write_parquet
    from .trl_export import TRL_VERSION, to_trl_dpo

    shards.check()
    out = Path(args.output)
    check_output(out, {"shards": str(shards.root), "tokenizer": args.tokenizer})
    max_length = args.max_length
    dataset = to_trl_dpo(shards, tokenizer=args.tokenizer, max_length=max_length)
    write_parquet(dataset.data.table, out / DATA_DIR / "train-00000-of-00001.parquet")
    print(f"wrote {dataset.num_rows} pairs to {out} (TRL {TRL_VERSION} conversational preference layout, reference sums "
          f"in ref_chosen_logps / ref_rejected_logps). Train with "
          f"wspo.shards.trl_export.DPOTrainerFromShards and DPOConfig(precompute_ref_log_probs=True, "
          f"max_length={max_length}); see docs/shard-format.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = SuggestingParser(
        prog="wspo-shards", allow_abbrev=False,
        description="Inspect and check wspo shard sets.",
        epilog="Columns:\n" + "\n".join(f"  {k:<14} {v}" for k, v in COLUMNS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", allow_abbrev=False, help="rows, tokens, reward statistics, scorers, tokenizer (JSON)")
    p.add_argument("shards")
    p = sub.add_parser("verify", allow_abbrev=False, help="checksums, schema version, completeness of every worker; exit 1 with what is wrong")
    p.add_argument("shards")
    p.add_argument("--quick", action="store_true", help="sizes and row counts only, no sha256")
    p = sub.add_parser("head", allow_abbrev=False, help="the first rows with per-token rewards next to their token strings")
    p.add_argument("shards")
    p.add_argument("-n", type=int, default=2, help="rows to show (default 2)")
    p.add_argument("--tokens", type=int, default=40, help="tokens to show per row (default 40)")
    p = sub.add_parser("show", help="a page of responses coloured token by token by their reward (HTML)")
    p.add_argument("shards")
    p.add_argument("--html", required=True, help="the HTML file to write")
    p.add_argument("-n", type=int, default=20, dest="rows", help="rows with the highest and with the lowest sums (default 20 each)")
    p = sub.add_parser("project", allow_abbrev=False, help="how lossy reward projection onto another tokenizer is (JSON)")
    p.add_argument("--tokenizer", required=True, help="folder or hub name of the strong model's tokenizer")
    p.add_argument("--end-of-turn-token", default=None, help="end-of-turn token of that tokenizer (default: its eos)")
    p.add_argument("shards")
    p = sub.add_parser("export", allow_abbrev=False, help="the set in another trainer's layout: --format trl-dpo (TRL's DPOTrainer)")
    p.add_argument("--format", required=True, choices=["trl-dpo"], help="trl-dpo: chosen/rejected pairs with reference sums for TRL 1.16")
    p.add_argument("--tokenizer", default=None, help="the tokenizer TRL will use (default: the shards' own)")
    p.add_argument("--max_length", default=1024, type=_length_or_none, help="the max_length TRL will run with (DPOConfig's, default 1024; 'none': no cut)")
    p.add_argument("shards")
    p.add_argument("output", help="folder to write (Parquet under OUTPUT/data/)")
    args = parser.parse_args(argv)
    try:
        shards = ShardSet.open(args.shards)
        return {"info": cmd_info, "verify": cmd_verify, "head": cmd_head, "show": cmd_show, "project": cmd_project,
                "export": cmd_export}[args.command](shards, args)
    except Exception as e:  # noqa: BLE001 - user-facing errors (WspoError) and disk faults are named; the rest is re-raised
        from wspo.disk import error_text

        then = "rerun the same command: the output is written whole or not at all"
        print(f"wspo-shards: error: {error_text(e, (WspoError,), getattr(args, 'html', None) or getattr(args, 'out', None), then)}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
