"""The Python API: the CLIs' twin (docs/api.md, DESIGN section 9).

    wspo.precompute(**keys)        -> ShardSet       wspo-precompute
    wspo.train(**keys)             -> TrainResult    wspo-train
    wspo.extrapolate(**keys)       -> Summary        wspo-extrapolate
    wspo.evaluate_rewards(**keys)  -> dict           wspo-eval rewards
    wspo.load_shards(path)         -> ShardSet       (verified on open)

Each function takes the command's keys as keywords, and optionally a YAML recipe path as its
first argument, exactly as the command line does: one parser (wspo.args.parse_keys over the same
dataclasses) converts and checks them, so keys, defaults, validation and `--help` texts are the
CLI's. Failures raise `wspo.WspoError` subclasses carrying the CLI's messages. Nothing is written
to stdout: progress bars go to stderr (`disable_tqdm=True` turns them off), and what a library
would print on stdout is sent to stderr as well.

`wspo.precompute`, `wspo.train` and `wspo.extrapolate` are also the names of subpackages, so the
subpackage modules themselves are made callable (`CallableModule`): `wspo.precompute(...)` runs
phase one, and `import wspo.precompute.cli` keeps working, whichever comes first.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path


class CallableModule(types.ModuleType):
    """A subpackage that is also the API function of the same name (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        return API[self.__name__.rpartition(".")[2]](*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Called by a subpackage's __init__: `wspo.<name>(...)` then calls the API function `<name>`."""
    sys.modules[module_name].__class__ = CallableModule


@contextlib.contextmanager
def library_bars(disable_tqdm: bool):
    """With `disable_tqdm`, the bars of transformers (loading weights) and datasets are off too,
    for the duration (the CLIs and the API)."""
    import transformers

    try:
        import datasets
    except ImportError:  # a node with torch and transformers alone (only hub datasets need it): no bars of its own
        datasets = None

    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    datasets_bars = datasets is not None and not datasets.are_progress_bars_disabled()
    if disable_tqdm:
        transformers.utils.logging.disable_progress_bar()
        if datasets is not None:
            datasets.disable_progress_bars()
    try:
        yield
    finally:
        if disable_tqdm and hf_bars:
            transformers.utils.logging.enable_progress_bar()
        if disable_tqdm and datasets_bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 and sys.stdout point at stderr for the duration: a library that prints,
    or that set up a logging handler on stdout when it was imported (DeepSpeed does), then writes
    to stderr too."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): Python-level only
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _no_stdout(function):
    """The API's results are return values: whatever runs inside the call (imports included)
    prints to stderr."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _stdout_to_stderr():
            return function(*args, **kwargs)
    return wrapper


def _split(args: tuple) -> str | None:
    if len(args) > 1:
        raise TypeError("give at most one positional argument: the path of a YAML recipe")
    return str(args[0]) if args else None


@_no_stdout
def load_shards(path, checksums: bool = True):
    """Open a shard set written by `wspo-precompute` and verify it (every file's size, row count
    and, with `checksums`, sha256). Raises ShardError naming what is wrong."""
    from wspo.shards.store import ShardSet

    return ShardSet.open(path).check(checksums=checksums)


@_no_stdout
def precompute(*recipe, **keys):
    """Phase one, `wspo-precompute [RECIPE.yaml] --key value ...`: returns the ShardSet written.

    With several workers (`num_workers`), a worker whose peers have not finished gets a ShardSet of
    its own manifest; once all have finished, the whole set.
    """
    from wspo.args import parse_keys
    from wspo.paths import check_output
    from wspo.precompute.config import PrecomputeArguments
    from wspo.shards.storage import is_url, shard_path
    from wspo.shards.store import ShardError, ShardSet

    (args,) = parse_keys([PrecomputeArguments], _split(recipe), keys, prog="wspo.precompute")
    if not is_url(args.output_dir):  # an object-store URL cannot be, hold or lie inside a local input (as the CLI)
        check_output(args.output_dir, {"dataset": args.dataset, "tokenizer": args.tokenizer, **args.scorer_paths()})
    with library_bars(args.disable_tqdm):
        if args.launcher == "ray":
            from wspo.precompute.launch import run_ray

            manifest = run_ray(args)
        else:
            from wspo.precompute.pipeline import run

            manifest = run(args)
    try:
        return ShardSet.open(args.output_dir)
    except ShardError:  # other workers of the set are still running
        return ShardSet(shard_path(args.output_dir), [manifest])


@dataclass
class TrainResult:
    """What `wspo.train` returns: where the model is, its final metrics, and the whole run record
    (the content of OUTPUT_DIR/wspo_run.json)."""

    output_dir: Path
    metrics: dict
    record: dict

    @property
    def summary(self) -> str:
        """The lines `wspo-train` prints at the end."""
        from wspo.train.cli import closing_summary

        return closing_summary(self.record)


@_no_stdout
def train(*recipe, callbacks: list | None = None, **keys) -> TrainResult:
    """Phase two, `wspo-train [RECIPE.yaml] --key value ...` (WSPOArguments + TrainingArguments
    keys); `callbacks` are extra transformers TrainerCallbacks. Returns a TrainResult."""
    from transformers import TrainingArguments

    from wspo.args import parse_keys
    from wspo.train.cli import check_training_args
    from wspo.train.config import WSPOArguments

    args, training_args = parse_keys([WSPOArguments, TrainingArguments], _split(recipe), keys, prog="wspo.train")
    check_training_args(args, training_args)
    from wspo.train.pipeline import run

    with library_bars(training_args.disable_tqdm):
        record = run(args, training_args, callbacks=callbacks)
    return TrainResult(Path(record["output_dir"]), record["metrics"]["final"], record)


@_no_stdout
def extrapolate(*recipe, **keys):
    """ExPO, `wspo-extrapolate [RECIPE.yaml] --key value ...`: returns the run's Summary
    (output_dirs, tensors, bytes_written, swallowed, ...). The swallowed-step warning is a Python
    warning (`SwallowedStepWarning`)."""
    from wspo.args import parse_keys
    from wspo.extrapolate.cli import ExtrapolateArguments, run

    (args,) = parse_keys([ExtrapolateArguments], _split(recipe), keys, prog="wspo.extrapolate")
    with library_bars(args.disable_tqdm):
        return run(args)


@_no_stdout
def evaluate_rewards(*recipe, **keys) -> dict:
    """`wspo-eval rewards [RECIPE.yaml] --key value ...`: returns the JSON summary the command
    prints (and writes `output_file` / `pairs_file` when they are set, as the command does)."""
    from wspo.args import parse_keys
    from wspo.evaluation.cli import run_rewards
    from wspo.evaluation.config import RewardsArguments

    (args,) = parse_keys([RewardsArguments], _split(recipe), keys, prog="wspo.evaluate_rewards")
    with library_bars(args.disable_tqdm):
        return run_rewards(args)


API = {"precompute": precompute, "train": train, "extrapolate": extrapolate}
