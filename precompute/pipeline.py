"""Phase one: dataset -> sequences -> scores -> shard rows (DESIGN sections 3, 4, 7, 8).

    run(args)
      1. open the split lazily (data.py: counted and fingerprinted, read by block) and stream this
         worker's block of rows through the tokenization rule (shards/tokenization.py); malformed
         rows are counted or, in strict mode, an error naming the row;
      2. cut the sequences into parts of `rows_per_file` rows, the unit of writing and resuming,
         each kept on disk in `_work-<worker>/seq-<part>.parquet`: memory holds one part at a time;
      3. for each scorer in turn (one model in memory at a time), score the parts that lack its
         log-probs and keep them in `_work-<worker>/` (atomic files, so a kill loses one part);
      4. assemble each part's rows (log-probs, reward = aligned - ref) into its Parquet file;
      5. build the worker's manifest (shards/manifest.py), write it last, then drop the work folder.

A rerun of the same command skips what is already on disk and ends with byte-identical files:
scoring batches never cross parts, so a part's numbers do not depend on what ran before it.
Peak memory is set by the models and `rows_per_file`, never by the number of rows in the split.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from wspo.errors import NonFiniteError, WspoError
from wspo.models import (
    check_weights, default_device, load_tokenizer, model_fingerprint, read_config, release_freed_memory, resolve_dtype,
    resolve_model_dir,
)
from wspo.shards.schema import canonical_json, has_reward, logp_column, row_id, row_schema
from wspo.shards.card import write_card
from wspo.shards.manifest import build_manifest, manifest_name, run_fingerprint
from wspo.shards.store import (
    RewardStatistics, ShardSet, file_record, list_arrays, part_name, write_json, write_manifest, write_parquet,
)
from wspo.shards.lock import OutputLock
from wspo.shards.topk import encode_topk, ids_column, logps_column, manifest_record, topk_fields
from wspo.shards.storage import AnyPath, parquet_file, read_parquet, read_parquet_schema, remove_tree, shard_path
from wspo.shards.tokenization import ResponseTokenizer, Skip

from .config import PrecomputeArguments
from .data import DatasetExample, Source, detect_format, open_source, to_example
from .scorers import open_scorer, resolve_compile

# Reasons that mean the row itself is malformed: an error in strict mode. Others (a prompt over
# max_prompt_length) are a property of the settings, counted in every mode.
MALFORMED = ("missing_field", "wrong_type", "empty_response", "last_turn_not_assistant", "slot_not_in_layout",
             "template_error", "invalid_json", "invalid_text")

# The columns a part's sequences keep on disk between scorers: the shard row's text columns plus
# the prompt ids the scorers see.
SEQUENCE_SCHEMA = pa.schema(
    [f for f in row_schema([]) if f.name not in ("n_tokens",)] + [pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False)]
)


class PrecomputeError(WspoError):
    """A phase-one failure with a message for the user (the CLI prints it without a traceback)."""


class NonFiniteScoresError(PrecomputeError, NonFiniteError):
    """A scorer returned NaN or infinite log-probs; nothing was published for those rows."""


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


# -- step 1: rows -> sequences ------------------------------------------------------------------


def worker_block(num_rows: int, num_workers: int, worker_index: int) -> range:
    """The contiguous block of source rows this worker scores: deterministic, disjoint, complete."""
    return range(num_rows * worker_index // num_workers, num_rows * (worker_index + 1) // num_workers)


def iter_sequences(args: PrecomputeArguments, source: Source, block: range, layout: str,
                   tokenize: ResponseTokenizer, skipped: Counter, progress=None):
    """This worker's sequences in (row, slot) order, one row at a time; skips are counted in `skipped`."""
    for index, row in zip(block, source.rows(block.start, block.stop)):
        if progress is not None:
            progress.update(1)
        try:
            example: DatasetExample = to_example(index, row, layout, args.slot_list, args.column_map)
            tokenized = {slot: tokenize(*example.responses[slot]) for slot in args.slot_list}
        except Skip as skip:
            if args.strict and skip.reason in MALFORMED:
                raise PrecomputeError(f"dataset {args.dataset} split {args.dataset_split}, row {index}: {skip}") from None
            skipped[skip.reason] += len(args.slot_list)
            continue
        for slot, tok in tokenized.items():
            messages, response = example.responses[slot]
            yield Sequence(
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


def sequence_table(part: list[Sequence]) -> pa.Table:
    return pa.table({f.name: [getattr(s, f.name) for s in part] for f in SEQUENCE_SCHEMA}, schema=SEQUENCE_SCHEMA)


@dataclass
class BuildSummary:
    num_parts: int
    rows_written: int
    response_tokens: int
    sequence_tokens: int  # prompt + response tokens: what every scorer forwards
    truncated: int
    skipped: Counter


def build_parts(args: PrecomputeArguments, source: Source, block: range, layout: str, tokenize: ResponseTokenizer,
                out: AnyPath, work: AnyPath, run_fp: str) -> tuple[BuildSummary, set[int]]:
    """Stream the block into parts of `rows_per_file` sequences, each written to `work/seq-<k>.parquet`
    unless it is already there or its shard file was assembled: one part in memory at a time.

    The whole block is streamed on every run, resumed or not, so the counts are always complete;
    tokenizing is cheap next to scoring, and only the missing parts are written. Returns the
    summary and the parts whose shard file an interrupted run of this command already assembled.
    """
    summary, assembled = BuildSummary(0, 0, 0, 0, 0, Counter()), set()

    def flush(part: list[Sequence]) -> None:
        k = summary.num_parts
        path = work / f"seq-{k:05d}.parquet"
        if _has_fingerprint(out / part_name(args.worker_index, k), run_fp):
            assembled.add(k)
        elif not _has_fingerprint(path, run_fp):
            write_parquet(sequence_table(part), path, {"wspo.run_fingerprint": run_fp})
        summary.num_parts += 1

    part: list[Sequence] = []
    with tqdm(total=len(block), desc=f"tokenizing{_worker_tag(args)}", unit="row", dynamic_ncols=True, mininterval=1.0,
              disable=args.disable_tqdm) as bar:
        for seq in iter_sequences(args, source, block, layout, tokenize, summary.skipped, progress=bar):
            part.append(seq)
            summary.rows_written += 1
            summary.response_tokens += len(seq.token_ids)
            summary.sequence_tokens += len(seq.prompt_ids) + len(seq.token_ids)
            summary.truncated += seq.truncated
            if len(part) == args.rows_per_file:
                flush(part)
                part = []
        if part:
            flush(part)
    return summary, assembled


def _worker_tag(args: PrecomputeArguments) -> str:
    return f" [worker {args.worker_index}/{args.num_workers}]" if args.num_workers > 1 else ""


# -- step 3: scoring ----------------------------------------------------------------------------


def check_finite(scorer: str, part: pa.Table, logps: list[np.ndarray], source: str) -> None:
    bad = [i for i, lp in enumerate(logps) if not np.isfinite(lp).all()]
    check_finite_rows(scorer, part, bad, source)


def check_finite_rows(scorer: str, part: pa.Table, bad: list[int], source: str) -> None:
    if bad:
        ids, example_ids, slots = (part[c].to_pylist() for c in ("id", "example_id", "slot"))
        names = ", ".join(f"{example_ids[i]}/{slots[i]} (id {ids[i][:12]})" for i in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise NonFiniteScoresError(
            f"scorer {scorer} ({source}) returned NaN or infinite log-probs for {len(bad)} row(s): {names}{more}. "
            "Nothing was published for these rows; check the model's weights and dtype (float16 overflows are common)."
        )


def score_parts(args, scorer_name: str, model_dir: Path, num_parts: int, work: AnyPath, run_fp: str,
                assembled: set[int]) -> None:
    """Score every part that is neither assembled nor scored by this scorer yet; one model load at most."""
    todo = [k for k in range(num_parts) if k not in assembled and not (work / f"{scorer_name}-{k:05d}.parquet").exists()]
    if not todo:
        return
    topk = args.topk if scorer_name in args.topk_scorer_list() else 0
    rows = sum(parquet_file(work / f"seq-{k:05d}.parquet").metadata.num_rows for k in todo)
    scorer = open_scorer(
        args.backend, model_dir, dtype=args.dtype, batch_tokens=args.batch_tokens,
        compile=args.backend == "hf" and resolve_compile(args.compile, rows), attn_implementation=args.attn_implementation,
        **({"tensor_parallel_size": args.tensor_parallel_size, "gpu_memory_utilization": args.gpu_memory_utilization,
            "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
            "max_model_len": args.max_length, "max_topk": topk} if args.backend == "vllm" else {}),
    )
    try:
        bar = tqdm(total=len(todo), desc=f"scoring {scorer_name}{_worker_tag(args)}", unit="part", dynamic_ncols=True,
                   disable=args.disable_tqdm)
        start, tokens = time.perf_counter(), 0
        for k in todo:
            part = read_parquet(work / f"seq-{k:05d}.parquet", columns=["id", "example_id", "slot", "token_ids", "prompt_ids"])
            token_ids, prompt_ids = part["token_ids"].to_pylist(), part["prompt_ids"].to_pylist()
            logps = scorer.score([p + t for p, t in zip(prompt_ids, token_ids)], [len(p) for p in prompt_ids], topk=topk)
            top = None
            if topk:
                logps, top = [lp for lp, _, _ in logps], [(v, i) for _, v, i in logps]
                # the top-k log-probs, like the actual token's, must be finite to be published
                check_finite_rows(scorer_name, part, [i for i, (v, _) in enumerate(top) if not np.isfinite(v).all()],
                                  str(model_dir))
            check_finite(scorer_name, part, logps, str(model_dir))
            for i, (lp, ids) in enumerate(zip(logps, token_ids)):
                if len(lp) != len(ids):
                    raise PrecomputeError(f"scorer {scorer_name}: {len(lp)} log-probs for {len(ids)} tokens (row {part['id'][i]})")
            table = pa.table({logp_column(scorer_name): pa.array([lp.astype(np.float32) for lp in logps], pa.list_(pa.float32()))})
            if top is not None:
                table = _with_topk(table, scorer_name, top, args.topk_encoding)
            write_parquet(table, work / f"{scorer_name}-{k:05d}.parquet", {"wspo.run_fingerprint": run_fp})
            tokens += sum(len(p) + len(t) for p, t in zip(prompt_ids, token_ids))
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        bar.close()
    finally:
        scorer.close()


def _with_topk(table: pa.Table, scorer: str, top: list, encoding: str) -> pa.Table:
    """A scorer's work table plus its encoded top-k columns (shards/topk.py)."""
    encoded = [encode_topk(values, ids, encoding) for values, ids in top]
    ids_field, logps_field = topk_fields(scorer, encoding)
    table = table.append_column(ids_field, pa.array([i for i, _ in encoded], ids_field.type))
    return table.append_column(logps_field, pa.array([v for _, v in encoded], logps_field.type))


# -- step 4: assembling parts -------------------------------------------------------------------


def part_table(sequences: pa.Table, scorers: list[str], logps: dict[str, pa.ChunkedArray],
               topk: dict | None = None, topk_columns: dict[str, pa.ChunkedArray] | None = None) -> pa.Table:
    """A part's shard rows: the sequences' text columns, each scorer's log-probs (and top-k
    columns: `topk` the manifest's record, `topk_columns` by column name), the reward."""
    columns = {f.name: sequences[f.name] for f in row_schema([]) if f.name in sequences.column_names}
    for name in scorers:
        columns[logp_column(name)] = logps[name]
    columns.update(topk_columns or {})
    if has_reward(scorers):
        # Difference in float64, stored as float32; reward_sum is the sum of the stored values,
        # so sums are conserved exactly downstream.
        rewards = [
            (np.asarray(a, np.float64) - np.asarray(r, np.float64)).astype(np.float32)
            for a, r in zip(list_arrays(logps["weak_aligned"]), list_arrays(logps["weak_ref"]))
        ]
        columns["reward"] = pa.array(rewards, pa.list_(pa.float32()))
        columns["reward_sum"] = [float(r.astype(np.float64).sum()) for r in rewards]
    columns["n_tokens"] = pc.list_value_length(sequences["token_ids"]).cast(pa.int32())
    columns["truncated"] = sequences["truncated"]
    schema = row_schema(scorers, topk)
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


# -- the run ------------------------------------------------------------------------------------


def _has_fingerprint(path: AnyPath, run_fp: str) -> bool:
    """A file this run wrote (files appear by rename or whole upload, so such a file is whole)."""
    try:
        return read_parquet_schema(path).metadata.get(b"wspo.run_fingerprint") == run_fp.encode()
    except (OSError, pa.ArrowException, AttributeError):
        return False


def _resume_state(out: AnyPath, work: AnyPath, manifest_path: AnyPath, run_fp: str, args: PrecomputeArguments) -> bool:
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
    remove_tree(work)
    for path in (out / part_name(args.worker_index, 0)).parent.glob(f"part-{args.worker_index:05d}-*.parquet"):
        path.unlink()
    return False


def _check_other_workers(out: AnyPath, args: PrecomputeArguments, identity: dict) -> None:
    """Refuse, before scoring, a worker whose set-mates (same `num_workers`, finished or interrupted)
    were run with other settings: their manifests' run fingerprints must be this run's with only
    the worker index changed. Readers would refuse the mixed set; this says so before any work."""
    n = args.num_workers
    for i in (i for i in range(n) if n > 1 and i != args.worker_index):
        manifest_path, run_path = out / manifest_name(n, i), out / f"_work-{i:05d}" / "run.json"
        manifest = _read_json(manifest_path)
        recorded = manifest.get("run_fingerprint") or _read_json(run_path).get("run_fingerprint")
        mate = {**identity, "workers": {"num_workers": n, "worker_index": i}}
        if recorded is None or recorded == run_fingerprint(mate):
            continue
        differ = [k for k in ("run_settings", "tokenizer", "scorers") if manifest and manifest.get(k) != identity[k]]
        what = {"run_settings": "dataset or options", "tokenizer": "tokenizer", "scorers": "scorer models"}
        raise PrecomputeError(
            f"worker {i} of the shard set in {out} ({manifest_path.name if manifest else run_path}) was run with other "
            f"{', '.join(what[k] for k in differ) or 'settings'} than this worker: the workers of one set must share the "
            "dataset, models, tokenizer and options. Run this worker with that worker's settings, or use another output_dir."
        )


def _read_json(path: AnyPath) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tokenizer_record(tokenize: ResponseTokenizer, out: AnyPath, work: AnyPath, identity_fp) -> dict:
    """The rule's manifest record (`describe`) under the fingerprint definition the output already
    uses: a set, or an interrupted run, begun before definition 2 keeps definition 1, so it
    resumes (or is found complete) and its workers' manifests agree. `identity_fp(record)` is the
    run fingerprint a record gives."""
    for path in sorted(out.glob("manifest*.json")):  # this worker's or another's finished manifest
        record = _read_json(path).get("tokenizer") or {}
        if "fingerprint" in record:
            if record.get("fingerprint_version", 1) == 1:
                legacy = tokenize.describe(fingerprint_version=1)
                if record["fingerprint"] == legacy["fingerprint"]:
                    return legacy
            return tokenize.describe()
    run = _read_json(work / "run.json")  # an interrupted run of this worker
    if run.get("run_fingerprint") and run.get("fingerprint_version", 1) == 1:
        legacy = tokenize.describe(fingerprint_version=1)
        if identity_fp(legacy) == run["run_fingerprint"]:
            return legacy
    return tokenize.describe()


def _check_topk_vocabulary(k: int, scorer_dirs: dict[str, Path]) -> None:
    for name, model_dir in scorer_dirs.items():
        config = read_config(model_dir)
        vocab = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
        if vocab is not None and k > vocab:
            raise PrecomputeError(f"topk {k} exceeds the {vocab} tokens of {name} ({model_dir}); set --topk {vocab} or lower")


class IdenticalScorersWarning(UserWarning):
    """weak_ref and weak_aligned are one model: every reward will be exactly zero."""


def check_weak_pair(args: PrecomputeArguments, scorers: list[dict], scorer_dirs: dict[str, Path]) -> None:
    """weak_ref and weak_aligned naming the same model, or two folders with identical config and
    weight files (equal fingerprints), would score for minutes and write all-zero rewards: warn
    before scoring; in strict mode refuse."""
    fingerprints = {s["name"]: s["fingerprint"] for s in scorers}
    if not {"weak_ref", "weak_aligned"} <= set(fingerprints):
        return
    same_dir = scorer_dirs["weak_ref"].resolve() == scorer_dirs["weak_aligned"].resolve()
    if not same_dir and fingerprints["weak_ref"] != fingerprints["weak_aligned"]:
        return
    what = "name the same model" if same_dir else "have identical config and weight files"
    message = (f"weak_ref ({args.weak_ref}) and weak_aligned ({args.weak_aligned}) {what}: "
               "every reward would be exactly 0. "
               "Give the weak model before alignment (SFT) as weak_ref and the one after (DPO) as weak_aligned.")
    if args.strict:
        raise PrecomputeError(message + " (refused in strict mode)")
    warnings.warn(message, IdenticalScorersWarning, stacklevel=2)


def check_scorers(args: PrecomputeArguments) -> tuple[dict[str, Path], ResponseTokenizer, dict]:
    """Before step 1: the scorers' model folders, checked (whole weights, max_length within their
    positions, one tokenizer for all), the tokenization rule, and the lengths it runs under."""
    scorer_paths = args.scorer_paths()
    scorer_dirs = {name: resolve_model_dir(path, option=name) for name, path in scorer_paths.items()}
    tokenizer_source = args.tokenizer or str(scorer_dirs[next(iter(scorer_dirs))])
    positions_of = {name: read_config(model_dir).get("max_position_embeddings") for name, model_dir in scorer_dirs.items()}
    lengths = args.resolve_lengths(positions_of)
    tokenize = ResponseTokenizer(load_tokenizer(tokenizer_source), args.max_length, args.max_prompt_length, args.end_of_turn_token)
    for name, model_dir in scorer_dirs.items():
        check_weights(model_dir, option=name)
        positions = positions_of[name]
        if positions is not None and args.max_length > positions:
            # Both backends refuse alike: hf would score past the limit silently, vLLM die in its config check.
            raise PrecomputeError(f"{name}: max_length {args.max_length} exceeds the {positions} positions of model "
                                  f"{model_dir} (max_position_embeddings); set --max_length {positions} or lower")
        try:
            tokenize.check_model(model_dir)
        except ValueError as e:
            raise PrecomputeError(f"{name}: {e}; every scorer must score the same token ids") from None
    return scorer_dirs, tokenize, lengths


def identity_builder(args: PrecomputeArguments, source: Source, layout: str, scorer_dirs: dict[str, Path]):
    """What this worker's output is, as a function of the tokenizer record (`_tokenizer_record`
    picks that one): run settings, tokenizer, scorers (their fingerprints), workers, top-k. The
    manifest holds it; its `run_fingerprint` decides what a rerun resumes."""
    scorer_paths = args.scorer_paths()
    scorers = [
        {"name": name, "model": scorer_paths[name], "fingerprint": model_fingerprint(model_dir),
         "backend": args.backend, "dtype": str(resolve_dtype(args.dtype, default_device())).removeprefix("torch.")}
        for name, model_dir in scorer_dirs.items()
    ]
    check_weak_pair(args, scorers, scorer_dirs)
    run_settings = {
        "dataset": {"source": args.dataset, "split": args.dataset_split, "format": layout,
                    "fingerprint": source.fingerprint, "slots": args.slot_list,
                    "max_samples": args.max_samples, "column_map": args.column_map},
        "strict": args.strict,
        "rows_per_file": args.rows_per_file,
    }
    workers = {"num_workers": args.num_workers, "worker_index": args.worker_index}
    topk = manifest_record(args.topk, args.topk_encoding, args.topk_scorer_list()) if args.topk else None
    if topk:
        _check_topk_vocabulary(args.topk, {name: scorer_dirs[name] for name in topk["scorers"]})

    def identity_of(tokenizer_record: dict) -> dict:
        identity = {"run_settings": run_settings, "tokenizer": tokenizer_record, "scorers": scorers, "workers": workers}
        return identity | ({"topk": topk} if topk else {})  # sets without top-k keep their fingerprint

    return identity_of


def assemble_parts(args: PrecomputeArguments, out: AnyPath, work: AnyPath, num_parts: int, names: list[str],
                   topk: dict | None, run_fp: str, assembled: set[int]) -> tuple[list[dict], dict | None]:
    """Step 4: every part's shard rows written (`part_table`) unless an interrupted run already
    did; returns the manifest's file records and reward summary."""
    files, stats = [], RewardStatistics()
    for k in range(num_parts):
        path = out / part_name(args.worker_index, k)
        if k in assembled:
            table = read_parquet(path)  # assembled before an interruption
        else:
            sequences = read_parquet(work / f"seq-{k:05d}.parquet")
            scored = {name: read_parquet(work / f"{name}-{k:05d}.parquet") for name in names}
            logps = {name: scored[name][logp_column(name)] for name in names}
            extra = {c: scored[name][c] for name in (topk or {}).get("scorers", []) for c in (ids_column(name), logps_column(name))}
            table = part_table(sequences, names, logps, topk, extra)
            write_parquet(table, path, {"wspo.run_fingerprint": run_fp})
        stats.add(table)
        files.append(file_record(path, tokens=int(pc.sum(table["n_tokens"]).as_py()), root=out))
        del table
    return files, stats.result()


def run(args: PrecomputeArguments, lock_owner: str | None = None) -> dict:
    """Run phase one for this worker; returns its manifest.

    `lock_owner` names the launch this worker belongs to (the Ray launcher's run id): a retried task
    of the same launch takes over the lock its dead predecessor left, wherever that ran.
    """
    started = time.perf_counter()
    out = shard_path(args.output_dir)  # a local folder or a URL (shards/storage.py)
    scorer_dirs, tokenize, lengths = check_scorers(args)
    source = open_source(args.dataset, args.dataset_split, args.max_samples)
    layout = detect_format(source.head()) if args.dataset_format == "auto" else args.dataset_format
    block = worker_block(source.num_rows, args.num_workers, args.worker_index)
    identity_of = identity_builder(args, source, layout, scorer_dirs)

    out.mkdir(parents=True, exist_ok=True)
    work = out / f"_work-{args.worker_index:05d}"
    tokenizer_record = _tokenizer_record(tokenize, out, work, lambda record: run_fingerprint(identity_of(record)))
    identity = identity_of(tokenizer_record)
    run_fp = run_fingerprint(identity)
    manifest_path = out / manifest_name(args.num_workers, args.worker_index)
    with OutputLock(out, args.worker_index, owner=lock_owner):
        _check_other_workers(out, args, identity)
        if _resume_state(out, work, manifest_path, run_fp, args):
            print(f"{manifest_path} is already complete for these settings; nothing to do.", file=sys.stderr)
            return json.loads(manifest_path.read_text())
        work.mkdir(exist_ok=True)
        write_json({"run_fingerprint": run_fp, "fingerprint_version": tokenizer_record.get("fingerprint_version", 1)},
                   work / "run.json")

        built, assembled = build_parts(args, source, block, layout, tokenize, out, work, run_fp)  # steps 1 and 2
        # The parts hold every sequence now: the tokenizer (~200 MiB for Qwen2's 152k vocabulary)
        # would only sit beside the scorers.
        del tokenize
        release_freed_memory()
        if not built.num_parts:
            raise PrecomputeError(f"no rows to score in {args.dataset} split {args.dataset_split} "
                                  f"(skipped: {dict(built.skipped) or 'none'})")
        names = list(scorer_dirs)
        for name in names:  # step 3
            score_parts(args, name, scorer_dirs[name], built.num_parts, work, run_fp, assembled)
        files, reward = assemble_parts(args, out, work, built.num_parts, names, identity.get("topk"), run_fp, assembled)

        seconds = time.perf_counter() - started  # step 5
        command = " ".join(["wspo-precompute", *map(shlex.quote, sys.argv[1:])])
        manifest = build_manifest(identity, command, worker_counts(args, source, block, built), files, lengths, reward, {
            "seconds": round(seconds, 3), "sequence_tokens": built.sequence_tokens,
            "tokens_per_second": round(built.sequence_tokens * len(names) / seconds, 1)})
        write_manifest(manifest, manifest_path)
        write_card(out)
        remove_tree(work)
        return manifest


def worker_counts(args: PrecomputeArguments, source: Source, block: range, built: BuildSummary) -> dict:
    """The manifest's counts: rows in the split and read, sequences asked for and written, tokens."""
    return {
        "rows_in_split": source.num_rows,
        "rows_read": len(block),
        "sequences_requested": len(block) * len(args.slot_list),
        "rows_written": built.rows_written,
        "response_tokens": built.response_tokens,
        "truncated": built.truncated,
        "skipped": dict(sorted(built.skipped.items())),
    }
