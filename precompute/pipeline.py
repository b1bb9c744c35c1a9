"""Phase one: dataset -> sequences -> scores -> shard rows (DESIGN sections 3, 4, 7).

    run(args)
      1. read the split, keep this worker's block of rows, normalise each row (data.py) and apply
         the tokenization rule (shards/tokenization.py); malformed rows are counted or, in strict
         mode, an error naming the row;
      2. cut the sequences into parts of `rows_per_file` rows: the unit of writing and resuming;
      3. for each scorer in turn (one model in memory at a time), score the parts that lack its
         log-probs and keep them in `_work-<worker>/` (atomic files, so a kill loses one part);
      4. assemble each part's rows (log-probs, reward = aligned - ref) into its Parquet file;
      5. write the worker's manifest last, then drop the work folder.

A rerun of the same command skips what is already on disk and ends with byte-identical files:
scoring batches never cross parts, so a part's numbers do not depend on what ran before it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

import wspo
from wspo.models import default_device, load_tokenizer, resolve_dtype, model_fingerprint, resolve_model_dir
from wspo.shards.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    canonical_json,
    has_reward,
    logp_column,
    row_id,
    row_schema,
)
from wspo.shards.store import ShardSet, file_record, list_arrays, reward_statistics, manifest_name, part_name, write_json, write_parquet
from wspo.shards.tokenization import ResponseTokenizer, Skip

from .config import PrecomputeArguments
from .data import Example, dataset_fingerprint, detect_format, load_rows, to_example
from .scorers import open_scorer

# Reasons that mean the row itself is malformed: an error in strict mode. Others (a prompt over
# max_prompt_length) are a property of the settings, counted in every mode.
MALFORMED = ("missing_field", "wrong_type", "empty_response", "last_turn_not_assistant", "slot_not_in_layout", "template_error")


class PrecomputeError(Exception):
    """A phase-one failure with a message for the user (the CLI prints it without a traceback)."""


@dataclass
class Sequence:
    """One response to score: the shard row's text columns plus the ids the scorers see."""

    id: str
    example_id: str
    slot: str
    messages: str
    response: str
    token_ids: list[int]
    token_start: list[int]
    token_end: list[int]
    truncated: bool
    prompt_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids


# -- step 1: rows -> sequences ------------------------------------------------------------------


def worker_block(num_rows: int, num_workers: int, worker_index: int) -> range:
    """The contiguous block of source rows this worker scores: deterministic, disjoint, complete."""
    return range(num_rows * worker_index // num_workers, num_rows * (worker_index + 1) // num_workers)


def build_sequences(args: PrecomputeArguments, rows: list[dict], tokenize: ResponseTokenizer):
    """Sequences of this worker's rows, in (row, slot) order, and the skip counts by reason."""
    layout = detect_format(rows) if args.dataset_format == "auto" else args.dataset_format
    sequences, skipped = [], Counter()
    for index in worker_block(len(rows), args.num_workers, args.worker_index):
        try:
            example: Example = to_example(index, rows[index], layout, args.slot_list, args.column_map)
            tokenized = {slot: tokenize(*example.responses[slot]) for slot in args.slot_list}
        except Skip as skip:
            if args.strict and skip.reason in MALFORMED:
                raise PrecomputeError(f"dataset {args.dataset} split {args.dataset_split}, row {index}: {skip}") from None
            skipped[skip.reason] += len(args.slot_list)
            continue
        for slot, tok in tokenized.items():
            messages, response = example.responses[slot]
            sequences.append(
                Sequence(
                    id=row_id(messages, response),
                    example_id=example.example_id,
                    slot=slot,
                    messages=canonical_json(messages),
                    response=response,
                    token_ids=tok.token_ids,
                    token_start=tok.token_start,
                    token_end=tok.token_end,
                    truncated=tok.truncated,
                    prompt_ids=tok.prompt_ids,
                )
            )
    return sequences, layout, skipped


# -- step 3: scoring ----------------------------------------------------------------------------


def check_finite(scorer: str, part: list[Sequence], logps: list[np.ndarray], source: str) -> None:
    bad = [seq for seq, lp in zip(part, logps) if not np.isfinite(lp).all()]
    if bad:
        names = ", ".join(f"{s.example_id}/{s.slot} (id {s.id[:12]})" for s in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise PrecomputeError(
            f"scorer {scorer} ({source}) returned NaN or infinite log-probs for {len(bad)} row(s): {names}{more}. "
            "Nothing was published for these rows; check the model's weights and dtype (float16 overflows are common)."
        )


def score_parts(args, scorer_name: str, model_dir: Path, parts: list[list[Sequence]], work: Path, run_fp: str,
                assembled: set[int]) -> None:
    """Score every part that is neither assembled nor scored by this scorer yet; one model load at most."""
    todo = [k for k in range(len(parts)) if k not in assembled and not (work / f"{scorer_name}-{k:05d}.parquet").exists()]
    if not todo:
        return
    scorer = open_scorer(
        args.backend, model_dir, dtype=args.dtype, batch_tokens=args.batch_tokens,
        **({"tensor_parallel_size": args.tensor_parallel_size, "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": args.max_length} if args.backend == "vllm" else {}),
    )
    try:
        rows = sum(len(parts[k]) for k in todo)
        bar = tqdm(total=rows, desc=f"scoring {scorer_name}", unit="row", dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0
        for k in todo:
            part = parts[k]
            logps = scorer.score([s.input_ids for s in part], [len(s.prompt_ids) for s in part])
            check_finite(scorer_name, part, logps, str(model_dir))
            for seq, lp in zip(part, logps):
                if len(lp) != len(seq.token_ids):
                    raise PrecomputeError(f"scorer {scorer_name}: {len(lp)} log-probs for {len(seq.token_ids)} tokens (row {seq.id[:12]})")
            table = pa.table({logp_column(scorer_name): pa.array([lp.astype(np.float32) for lp in logps], pa.list_(pa.float32()))})
            write_parquet(table, work / f"{scorer_name}-{k:05d}.parquet", {"wspo.run_fingerprint": run_fp})
            tokens += sum(len(s.input_ids) for s in part)
            bar.update(len(part))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        bar.close()
    finally:
        scorer.close()


# -- step 4: assembling parts -------------------------------------------------------------------


def part_table(part: list[Sequence], scorers: list[str], logps: dict[str, list]) -> pa.Table:
    columns = {
        "id": [s.id for s in part],
        "example_id": [s.example_id for s in part],
        "slot": [s.slot for s in part],
        "messages": [s.messages for s in part],
        "response": [s.response for s in part],
        "token_ids": [s.token_ids for s in part],
        "token_start": [s.token_start for s in part],
        "token_end": [s.token_end for s in part],
    }
    for name in scorers:
        columns[logp_column(name)] = logps[name]
    if has_reward(scorers):
        # Difference in float64, stored as float32; reward_sum is the sum of the stored values,
        # so sums are conserved exactly downstream.
        rewards = [
            (np.asarray(a, np.float64) - np.asarray(r, np.float64)).astype(np.float32)
            for a, r in zip(logps["weak_aligned"], logps["weak_ref"])
        ]
        columns["reward"] = rewards
        columns["reward_sum"] = [float(r.astype(np.float64).sum()) for r in rewards]
    columns["n_tokens"] = [len(s.token_ids) for s in part]
    columns["truncated"] = [s.truncated for s in part]
    return pa.table(columns, schema=row_schema(scorers))


# -- the run ------------------------------------------------------------------------------------


def _assembled(path: Path, run_fp: str) -> bool:
    """A part file this run assembled (files appear by rename, so such a file is whole)."""
    try:
        return pq.read_schema(path).metadata.get(b"wspo.run_fingerprint") == run_fp.encode()
    except (OSError, pa.ArrowException):
        return False


def _resume_state(out: Path, work: Path, manifest_path: Path, run_fp: str, args: PrecomputeArguments) -> bool:
    """True when this worker's part of the set is already complete with these settings and verifies.

    Files of an interrupted run of the same command are kept and resumed. A finished set whose
    files no longer verify loses its manifest and the bad files, which are then rebuilt. Files
    written with other settings, or by another number of workers, are an error unless
    `overwrite`, which removes this worker's files only (other workers may share the directory).
    """
    n = args.num_workers
    foreign = [p for p in out.glob("manifest*.json")
               if not (p.name == "manifest.json" if n == 1 else p.name.endswith(f"-of-{n:05d}.json"))]
    recorded = None
    if manifest_path.exists():
        recorded = json.loads(manifest_path.read_text()).get("run_fingerprint")
    elif (work / "run.json").exists():
        recorded = json.loads((work / "run.json").read_text()).get("run_fingerprint")
    if not foreign and recorded in (None, run_fp):
        if recorded is None or not manifest_path.exists():
            return False
        bad = ShardSet(out, [json.loads(manifest_path.read_text())]).file_problems()
        if not bad:
            return True
        print(f"{manifest_path}: {len(bad)} file(s) no longer verify ({', '.join(bad)}); rebuilding them", file=sys.stderr)
        manifest_path.unlink()
        for name in bad:
            (out / name).unlink(missing_ok=True)
        return False
    if not args.overwrite:
        what = f"by another number of workers ({foreign[0].name})" if foreign else "with other settings (dataset, models, tokenizer or options differ)"
        raise PrecomputeError(
            f"output_dir {out} holds shards written {what}. Use another output_dir, or --overwrite true to replace them."
        )
    for path in foreign + [manifest_path]:
        path.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    for path in out.glob(f"part-{args.worker_index:05d}-*.parquet"):
        path.unlink()
    return False


def run(args: PrecomputeArguments) -> dict:
    """Run phase one for this worker; returns its manifest."""
    started = time.perf_counter()
    out = Path(args.output_dir)
    scorer_paths = args.scorer_paths()
    scorer_dirs = {name: resolve_model_dir(path, option=name) for name, path in scorer_paths.items()}
    tokenizer_source = args.tokenizer or str(scorer_dirs[next(iter(scorer_dirs))])
    tokenize = ResponseTokenizer(load_tokenizer(tokenizer_source), args.max_length, args.max_prompt_length, args.end_of_turn_token)
    for name, model_dir in scorer_dirs.items():
        try:
            tokenize.check_model(model_dir)
        except ValueError as e:
            raise PrecomputeError(f"{name}: {e}; every scorer must score the same token ids") from None

    rows = load_rows(args.dataset, args.dataset_split, args.max_samples)
    sequences, layout, skipped = build_sequences(args, rows, tokenize)
    if not sequences:
        raise PrecomputeError(f"no rows to score in {args.dataset} split {args.dataset_split} (skipped: {dict(skipped) or 'none'})")
    parts = [sequences[i : i + args.rows_per_file] for i in range(0, len(sequences), args.rows_per_file)]

    scorers = [
        {"name": name, "model": scorer_paths[name], "fingerprint": model_fingerprint(model_dir),
         "backend": args.backend, "dtype": str(resolve_dtype(args.dtype, default_device())).removeprefix("torch.")}
        for name, model_dir in scorer_dirs.items()
    ]
    run_settings = {
        "dataset": {"source": args.dataset, "split": args.dataset_split, "format": layout,
                    "fingerprint": dataset_fingerprint(rows), "slots": args.slot_list,
                    "max_samples": args.max_samples, "column_map": args.column_map},
        "strict": args.strict,
        "rows_per_file": args.rows_per_file,
    }
    identity = {"run_settings": run_settings, "tokenizer": tokenize.describe(), "scorers": scorers,
                "workers": {"num_workers": args.num_workers, "worker_index": args.worker_index}}
    run_fp = hashlib.sha256(canonical_json(identity).encode()).hexdigest()

    out.mkdir(parents=True, exist_ok=True)
    work = out / f"_work-{args.worker_index:05d}"
    manifest_path = out / manifest_name(args.num_workers, args.worker_index)
    if _resume_state(out, work, manifest_path, run_fp, args):
        print(f"{manifest_path} is already complete for these settings; nothing to do.", file=sys.stderr)
        return json.loads(manifest_path.read_text())
    work.mkdir(exist_ok=True)
    write_json({"run_fingerprint": run_fp}, work / "run.json")

    names = list(scorer_dirs)
    assembled = {k for k in range(len(parts)) if _assembled(out / part_name(args.worker_index, k), run_fp)}
    for name in names:
        score_parts(args, name, scorer_dirs[name], parts, work, run_fp, assembled)

    files, tables = [], []
    for k, part in enumerate(parts):
        path = out / part_name(args.worker_index, k)
        if k in assembled:
            table = pq.read_table(path)  # assembled before an interruption
        else:
            logps = {name: list_arrays(pq.read_table(work / f"{name}-{k:05d}.parquet")[logp_column(name)]) for name in names}
            table = part_table(part, names, logps)
            write_parquet(table, path, {"wspo.run_fingerprint": run_fp})
        tables.append(table)
        files.append(file_record(path, tokens=sum(len(s.token_ids) for s in part)))

    seconds = time.perf_counter() - started
    tokens_scored = sum(len(s.input_ids) for s in sequences)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "toolkit_version": wspo.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_fingerprint": run_fp,
        **identity,
        "counts": {
            "rows_in_split": len(rows),
            "rows_read": len(worker_block(len(rows), args.num_workers, args.worker_index)),
            "sequences_requested": len(worker_block(len(rows), args.num_workers, args.worker_index)) * len(args.slot_list),
            "rows_written": len(sequences),
            "response_tokens": sum(len(s.token_ids) for s in sequences),
            "truncated": sum(s.truncated for s in sequences),
            "skipped": dict(sorted(skipped.items())),
        },
        "files": files,
        "reward": reward_statistics(tables),
        "timing": {"seconds": round(seconds, 3), "sequence_tokens": tokens_scored,
                   "tokens_per_second": round(tokens_scored * len(names) / seconds, 1)},
    }
    write_json(manifest, manifest_path)
    shutil.rmtree(work)
    return manifest


