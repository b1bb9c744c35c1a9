"""Shard sets on an object store against a local folder: seconds to write and to read one set.

    python benchmarks/object_store.py [--rows 32000] [--workdir DIR]

A set of `--rows` rows is made cheaply as benchmarks/scale_train.py makes its sets (the bundled
sample scored once by the tiny weak pair, repeated with distinct ids, parts of 4,096 rows), then,
each step in its own process (peak RSS is that step's alone), against a local folder and against
a real S3 endpoint on localhost (moto's server, tests/s3_endpoint.py):

    write   every part as phase one writes it: `write_parquet` (a local temporary file, then a
            rename or an upload) + `file_record` (rows, bytes, sha256), then the manifest
    stream  S3 only, the alternative to the temporary file: Parquet streamed into the object
            (`fs.open(key, "wb")`, multipart upload), to compare time and memory; alternated with
            `write` to S3 `--repeat` times, best of each
    verify  `wspo-shards verify`: every file's size, rows and sha256
    cache   phase two's start: `ShardSet.open` + the checks `wspo-train` does + the row cache
            (each file read once into the local memory-mapped Arrow file)

Prints JSON: seconds and peak RSS (MiB) per step and target, and the ratio S3 / local. The
endpoint runs on the same machine, so the ratios price the protocol (HTTP, signing, moto's own
work), not a network.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def child(step: str, source: str, target: str, cache_dir: str) -> dict:
    """One step in this process: seconds and peak RSS."""
    import pyarrow.compute as pc

    from wspo.shards.storage import is_url, read_parquet, shard_path
    from wspo.shards.store import ShardSet, file_record, write_manifest, write_parquet

    import wspo.shards.store as store

    publish = store.publish
    if step == "stream":  # the alternative: Parquet streamed into the object (multipart upload), no local file

        def streamed(path, write):
            with path.fs.open(path.path, "wb") as f:  # pq.write_table takes a file object as well as a path
                write(f)

        store.publish = streamed
    start = time.perf_counter()
    if step in ("write", "stream"):
        src = ShardSet.open(source)
        out = shard_path(target)
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for record in src.files:
            table = read_parquet(src.root / record["path"])
            metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            write_parquet(table, out / record["path"], metadata)
            records.append(file_record(out / record["path"], int(pc.sum(table["n_tokens"]).as_py()), root=out))
            del table
        store.publish = publish  # the manifest as always
        manifest = dict(src.manifests[0], files=records)
        manifest.pop("checksum", None)
        write_manifest(manifest, out / "manifest.json")
    elif step == "verify":
        problems = ShardSet.open(target).verify()
        assert not problems, problems
    elif step == "cache":
        from wspo.train.row_cache import row_cache

        shards = ShardSet.open(target).check(checksums=not is_url(target))
        row_cache(shards, ["id", "example_id", "messages", "response", "token_ids", "truncated", "n_tokens", "reward"],
                  ["chosen"], Path(cache_dir))
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: a child keeps its parent's ru_maxrss across exec (see expo_memory.py)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    helper = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the row cache's helper process
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak / 2**20, 1),
            **({"helper_peak_rss_mib": round(helper / 2**20, 1)} if step == "cache" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--workdir", default=None, help="where the temporary files go (default: $TMPDIR)")
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs of the two ways of writing to S3")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(*args._child)))
        return

    from s3_endpoint import moto_endpoint, s3_environment
    from scale_train import base_shards, repeated_set

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="object_store_") as tmp, moto_endpoint() as endpoint:
        tmp = Path(tmp)
        env = os.environ | s3_environment(endpoint) | {"TOKENIZERS_PARALLELISM": "false"}
        os.environ.update(s3_environment(endpoint))
        source = repeated_set(base_shards(tmp), tmp / "source", args.rows)
        import s3fs

        s3fs.S3FileSystem(use_listings_cache=False).mkdir("bench")
        targets = {"local": str(tmp / "local"), "s3": "s3://bench/set"}

        def step(name: str, target: str, cache: str = "") -> dict:
            out = subprocess.run([sys.executable, __file__, "--_child", name, str(source), target, cache or str(tmp / "none")],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name} {target} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"step": name, "target": target, **result}), file=sys.stderr)
            return result

        results = {}
        for name in ("write", "verify", "cache"):
            results[name] = {where: step(name, target, str(tmp / f"cache-{where}")) for where, target in targets.items()}
            results[name]["s3_over_local"] = round(results[name]["s3"]["seconds"] / results[name]["local"]["seconds"], 2)
        # Temporary file + upload (what wspo does) against streaming, alternated, best of `--repeat` each.
        tries = {"write": [], "stream": []}
        for k in range(args.repeat):
            for name in tries:
                tries[name].append(step(name, f"s3://bench/{name}-{k}"))
        best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in tries.items()}
        results["stream_vs_temporary_file"] = {"temporary_file_then_upload": best["write"], "stream": best["stream"],
                                               "stream_over_temporary_file": round(best["stream"]["seconds"] /
                                                                                   best["write"]["seconds"], 2)}
        from wspo.shards.store import ShardSet

        shards = ShardSet.open(source)
        report = {"rows": shards.num_rows, "files": len(shards.files),
                  "bytes": sum(f["bytes"] for f in shards.files), **results,
                  "load_average": os.getloadavg()[0]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
