"""Cost follows the work (DESIGN section 8): peak memory and time at several data sizes.

    python benchmarks/scale.py [--phase one|two|both] [--sizes 2000 8000 32000] [--max_length 96]

`--phase one` (default): phase one, below. `--phase two`: 2 training steps of `wspo-train` on
shard sets of those sizes (`benchmarks/scale_train.py`, run as a subprocess; its JSON is
included). `--phase both`: one after the other.

The split is the bundled sample repeated with distinct ids (each copy's prompts get a suffix, so
row ids and example ids differ), written as JSON lines. Each size runs `wspo-precompute` with the
tiny embedded weak pair in its own process, so `ru_maxrss` is that run's alone. Short
`max_length` keeps the scoring cheap: the rows are all still read, tokenized and written, which
is what used to make memory grow. Prints JSON: per size, peak RSS (MiB) and seconds; the slope in
bytes per row (least squares); and the ratio of the largest size's peak to the smallest's
(goal: within 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_split(path: Path, rows: int) -> None:
    from wspo.embedded.sample import SAMPLE_DIR

    base = [json.loads(line) for line in (SAMPLE_DIR / "train_prefs.jsonl").read_text(encoding="utf-8").splitlines()]
    with open(path, "w", encoding="utf-8") as f:
        for k in range(rows):
            row = json.loads(json.dumps(base[k % len(base)]))
            copy = k // len(base)
            if copy:
                suffix = f" (variant {copy})"
                row["prompt"] += suffix
                row["prompt_id"] = f"{row['prompt_id']}-{copy}"
                for slot in ("chosen", "rejected"):
                    for message in row[slot]:
                        if message["role"] == "user":
                            message["content"] += suffix
                            break
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def child(argv: list[str]) -> None:
    """Run phase one in this process and print its peak RSS and time."""
    from wspo.precompute.cli import main

    start = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"status": status, "peak_rss_bytes": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--max_length", type=int, default=96)
    parser.add_argument("--rows_per_file", type=int, default=1024)
    parser.add_argument("--phase", choices=["one", "two", "both"], default="one")
    parser.add_argument("--_child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child is not None:
        return child(args._child)
    reports = {}
    if args.phase in ("one", "both"):
        reports["one"] = phase_one(args)
    if args.phase in ("two", "both"):
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("scale_train.py")), "--rows", *map(str, args.sizes)],
                             check=True, capture_output=True, text=True)
        reports["two"] = json.loads(out.stdout[out.stdout.index("{"):])
    print(json.dumps(reports if len(reports) > 1 else next(iter(reports.values())), indent=2))


def phase_one(args) -> dict:

    from wspo.embedded.models import build_weak_pair

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pair = build_weak_pair(tmp / "models")
        for size in args.sizes:
            split = tmp / f"split-{size}.jsonl"
            write_split(split, size)
            cmd = [sys.executable, __file__, "--_child", "--dataset", str(split), "--output_dir", str(tmp / f"out-{size}"),
                   "--weak_ref", str(pair["weak_ref"]), "--weak_aligned", str(pair["weak_aligned"]),
                   "--max_length", str(args.max_length), "--max_prompt_length", str(args.max_length * 3 // 4),
                   "--rows_per_file", str(args.rows_per_file), "--batch_tokens", "8192"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
            if out.returncode != 0:
                sys.exit(f"size {size} failed:\n{out.stderr[-3000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            manifest = json.loads((tmp / f"out-{size}" / "manifest.json").read_text())
            results.append({"rows": size, "rows_written": manifest["counts"]["rows_written"],
                            "peak_rss_mib": round(measured["peak_rss_bytes"] / 2**20, 1),
                            "seconds": round(measured["seconds"], 1)})
            print(json.dumps(results[-1]), file=sys.stderr)

    n = len(results)
    xs = [r["rows"] for r in results]
    ys = [r["peak_rss_mib"] * 2**20 for r in results]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1)
    return {
        "phase": "one",
        "sizes": results,
        "slope_bytes_per_row": round(slope, 1),
        "peak_ratio_largest_vs_smallest": round(results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"], 3),
        "seconds_per_1000_rows": [round(1000 * r["seconds"] / r["rows"], 2) for r in results],
    }


if __name__ == "__main__":
    main()
