"""Phase two's cost against the number of shard rows: prints one JSON object.

    python benchmarks/scale_train.py                          # 2,000 vs 32,000 rows
    python benchmarks/scale_train.py --rows 2000 8000 32000
    python benchmarks/scale_train.py --loss dpo               # DPO pairs (chosen + rejected rows)

The bundled sample is scored once by tiny weak models (phase one), then repeated with distinct
`id` / `example_id` (a suffix per copy) into shard sets of each size, written with the shard
format's own writer and manifest. For each size `wspo-train` (tiny strong model, WSPO, frozen
reference) runs 2 optimizer steps as a subprocess (no held-out rows: an evaluation pass would
scale with the held-out share); reported: its peak RSS (VmHWM polled from
/proc, see benchmarks/expo_memory.py) and wall time to the end of the run. Goal (issue 10): peak
RSS of the largest size within 10% of the smallest, time within 1.5x. The first run of each size
writes the memory-mapped row cache (train/rows.py); `--warm` also reports a second run reusing it.
`--loss dpo` scores chosen and rejected rows with the strong SFT model as the reference
(`logp_ref`) and trains DPO on the pairs (train/pairs.py); `--rows` counts rows, two per pair.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expo_memory import run_measured  # noqa: E402

ROWS_PER_PART = 4096


def base_shards(root: Path, loss: str = "wspo") -> Path:
    """Tiny weak pair + the bundled sample scored by it (chosen slot, as WSPO trains on); for DPO
    chosen and rejected rows, also scored by the strong SFT model as the reference."""
    from wspo.embedded.models import build_model, build_weak_pair
    from wspo.precompute.cli import main as precompute

    models = build_weak_pair(root / "models")
    build_model(root / "models" / "strong_sft", models["tokenizer"], size="strong", seed=0)
    out = root / "base"
    argv = ["--dataset", "embedded", "--output_dir", str(out), "--max_length", "256",
            "--max_prompt_length", "192", "--backend", "hf", "--dtype", "float32", "--batch_tokens", "8192",
            "--weak_ref", str(models["weak_ref"]), "--weak_aligned", str(models["weak_aligned"])]
    argv += ["--slots", "chosen,rejected", "--ref_model", str(root / "models" / "strong_sft")] if loss == "dpo" else ["--slots", "chosen"]
    if precompute(argv) != 0:
        raise SystemExit("phase one failed on the bundled sample")
    return out


def repeated_set(base: Path, out: Path, rows: int) -> Path:
    """`base`'s rows repeated to `rows` rows with distinct ids, as a shard set (parts + manifest)."""
    from wspo.shards.store import ShardSet, file_record, write_manifest, write_parquet

    source = ShardSet.open(base)
    manifest = json.loads((base / "manifest.json").read_text())
    table = source.read_table()
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    parent = Path(manifest["files"][0]["path"]).parent
    (out / parent).mkdir(parents=True, exist_ok=True)
    copies, records = [], []
    for copy in range(-(-rows // table.num_rows)):
        suffix = pa.scalar(f"-{copy}")
        copies.append(table.set_column(table.schema.get_field_index("id"), "id", pc.binary_join_element_wise(table["id"], suffix, ""))
                      .set_column(table.schema.get_field_index("example_id"), "example_id",
                                  pc.binary_join_element_wise(table["example_id"], suffix, "")))
    big = pa.concat_tables(copies).slice(0, rows).cast(table.schema)
    for k, start in enumerate(range(0, rows, ROWS_PER_PART)):
        part = big.slice(start, ROWS_PER_PART)
        path = out / parent / f"part-00000-{k:05d}.parquet"
        write_parquet(part, path, metadata)
        record = file_record(path, int(pc.sum(part["n_tokens"]).as_py()))
        record["path"] = str(parent / path.name)
        records.append(record)
    manifest["files"] = records
    # The counts must equal the sums over the files (readers check), and the checksum is new.
    manifest["counts"].update(rows_written=rows, response_tokens=sum(r["tokens"] for r in records))
    write_manifest(manifest, out / "manifest.json")
    ShardSet.open(out).check()
    return out


def train(shards: Path, model: Path, out: Path, loss: str = "wspo") -> tuple[int, float]:
    """(peak RSS bytes, seconds) of `wspo-train` for 2 optimizer steps."""
    exe = shutil.which("wspo-train")
    command = [exe] if exe else [sys.executable, "-m", "wspo.train.cli"]
    command += ["--shards", str(shards), "--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--max_length", "256", "--save_strategy", "no", "--report_to", "none",
                "--use_cpu", "true", "--dataloader_pin_memory", "false", "--disable_tqdm", "true", "--logging_steps", "1", "--eval_fraction", "0",
                "--loss", loss]
    peak, seconds, _ = run_measured(command)
    return peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 32000])
    parser.add_argument("--warm", action="store_true", help="also time a second run that reuses the row cache")
    parser.add_argument("--loss", choices=["wspo", "dpo"], default="wspo")
    parser.add_argument("--workdir", default=None, help="where the temporary files go (default: $TMPDIR)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="scale_train_") as tmp:
        tmp = Path(tmp)
        base = base_shards(tmp, args.loss)
        model = tmp / "models" / "strong_sft"
        results = []
        for rows in args.rows:
            shards = repeated_set(base, tmp / f"shards_{rows}", rows)
            peak, seconds = train(shards, model, tmp / f"out_{rows}", args.loss)
            result = {"rows": rows, "peak_rss_gb": round(peak / 1e9, 3), "seconds": round(seconds, 2)}
            if args.warm:
                peak, seconds = train(shards, model, tmp / f"out_{rows}", args.loss)  # same output_dir: the cache is reused
                result.update({"warm_peak_rss_gb": round(peak / 1e9, 3), "warm_seconds": round(seconds, 2)})
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
        small, large = results[0], results[-1]
        rss_ratio = large["peak_rss_gb"] / small["peak_rss_gb"]
        time_ratio = large["seconds"] / small["seconds"]
        print(json.dumps({
            "benchmark": "scale_train",
            "loss": args.loss,
            "steps": 2,
            "runs": results,
            "peak_rss_ratio": round(rss_ratio, 3),
            "time_ratio": round(time_ratio, 3),
            "goal": "peak_rss_ratio <= 1.10 and time_ratio <= 1.5",
            "goal_met": rss_ratio <= 1.10 and time_ratio <= 1.5,
        }, indent=2))


if __name__ == "__main__":
    main()
