"""What a training run is, and the guards that keep two runs from mixing in one output_dir.

A run's identity is what makes its weights what they are: the strong model it starts from (its
fingerprint: config and weight bytes, `models.model_fingerprint`), the shard sets it reads (their
fingerprints: the sha256 of their files), the loss and the keys that shape it, and the
tokenization rule (the strong tokenizer's fingerprint, projection, max_length). It is written to
`output_dir/wspo_identity.json` when the run starts and into every checkpoint before the Trainer
writes `trainer_state.json` there (so a complete checkpoint always carries one).

- `guard_output_dir`: one live writer per output_dir (`wspo.shards.lock.OutputLock`, dead holders
  taken over); a finished model, or checkpoints that this run would not resume, are never
  replaced without `--overwrite true`;
- `check_resume_identity`: a checkpoint written by another run (another model, other shards,
  another gamma, ...) is refused, naming what differs, unless `--allow_resume_mismatch true`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback

from wspo.errors import WspoError
from wspo.models import model_fingerprint
from wspo.shards.lock import OutputLock
from wspo.shards.store import write_json

from .checkpoints import FINAL_TMP, WEIGHTS, checkpoint_problem

IDENTITY_FILE = "wspo_identity.json"
RUN_FILE = "wspo_run.json"
LOSS_KEYS = {"wspo": ("gamma", "reference_logps"), "sft": (), "dpo": ("beta",),
             "wrpo": ("beta", "wrpo_alpha", "wrpo_alpha_schedule"), "kd": ("kd_alpha", "kd_temperature", "kd_scorer")}


class RunIdentityError(WspoError, ValueError):
    """output_dir or a checkpoint belongs to another run."""


def run_identity(args, model_dir: Path, shard_sets, reference_sets, rule, max_length: int, projected: bool) -> dict:
    return {
        "model": {"path": str(model_dir), "fingerprint": model_fingerprint(model_dir)},
        "shards": [s.fingerprint for s in shard_sets],
        "reference_shards": [s.fingerprint for s in reference_sets],
        "loss": {"name": args.loss, **{key: getattr(args, key) for key in LOSS_KEYS[args.loss]},
                 "use_lora": args.use_lora},
        "tokenizer": {"fingerprint": rule.fingerprint, "reward_projection": "chunks" if projected else "none",
                      "max_length": max_length},
    }


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: recorded -> current` for every leaf that differs (the model path is where, not what: left out)."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        name = f"{prefix}{key}"
        a, b = recorded.get(key), current.get(key)
        if name == "model.path":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, name + ".")
        elif a != b:
            lines.append(f"{name}: {_short(a)} -> {_short(b)}")
    return lines


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"  # a sha256
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return json.dumps(value)


def _read_identity(folder: Path) -> dict | None:
    try:
        return json.loads((folder / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None


def checkpoints(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]


def finished_model(output_dir: Path) -> str | None:
    """The file that shows output_dir holds a published model, or None."""
    for name in (RUN_FILE, *WEIGHTS):
        if (output_dir / name).exists():
            return name
    return None


def guard_output_dir(output_dir: Path, overwrite: bool, resume) -> None:
    """Refuse to write over another run's finished model or checkpoints; `overwrite` clears them.

    Called with the lock held, before anything of this run is written. `resume` is the
    `resume_from_checkpoint` value (a folder, `true`, or nothing).
    """
    resuming = resume not in (None, False, "", "false", "False")
    if overwrite and resuming and str(resume).lower() in ("true", "last", "latest"):
        raise RunIdentityError("--overwrite true removes the checkpoints that --resume_from_checkpoint "
                               f"{resume} would go on from: give one of the two")
    model = finished_model(output_dir)
    if overwrite:
        for folder in checkpoints(output_dir):
            shutil.rmtree(folder)
        for name in (RUN_FILE, IDENTITY_FILE):
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(output_dir / FINAL_TMP, ignore_errors=True)
        return
    if model is not None and not resuming:  # a resume may go on from its own run's model: checked later
        raise _finished(output_dir, model)
    # An incomplete checkpoint (a kill or a full disk while saving) is no earlier work: the
    # Trainer writes that step's folder again.
    old = [p for p in checkpoints(output_dir) if checkpoint_problem(p) is None]
    if old and not resuming:
        raise RunIdentityError(
            f"output_dir {output_dir} holds {len(old)} checkpoint(s) of an earlier run ({', '.join(sorted(p.name for p in old)[:3])}"
            f"{', ...' if len(old) > 3 else ''}). Go on from them with --resume_from_checkpoint true, use another "
            "output_dir, or --overwrite true to start over (they are removed)."
        )


def _finished(output_dir: Path, model: str) -> RunIdentityError:
    return RunIdentityError(
        f"output_dir {output_dir} already holds a finished model ({model}): it is never replaced silently. "
        "Use another output_dir, or --overwrite true to replace it (its checkpoints are removed too)."
    )


def guard_finished_model(output_dir: Path, identity: dict, allow_mismatch: bool) -> None:
    """A resume replaces a finished model in output_dir only when that model is this run's
    (the same identity: training it further), or the mismatch is allowed."""
    model = finished_model(output_dir)
    if model is not None and _read_identity(output_dir) != identity and not allow_mismatch:
        raise _finished(output_dir, model)


def check_resume_identity(checkpoint: str, identity: dict, allow_mismatch: bool) -> None:
    """Refuse a checkpoint whose recorded identity differs from this run's, naming what differs."""
    recorded = _read_identity(Path(checkpoint))
    if recorded is None:
        what = f"{checkpoint} records no run identity ({IDENTITY_FILE} missing: written by an older toolkit)"
        if not allow_mismatch:
            raise RunIdentityError(f"resume_from_checkpoint: {what}; to resume from it all the same, pass "
                                   "--allow_resume_mismatch true")
        print(f"{what}; resuming as allowed by --allow_resume_mismatch", file=sys.stderr)
        return
    diff = differences(recorded, identity)
    if not diff:
        return
    listing = "; ".join(diff)
    if not allow_mismatch:
        raise RunIdentityError(
            f"resume_from_checkpoint: {checkpoint} was written by another run ({listing}; checkpoint -> this run). "
            "Resume with the settings it was written with, or pass --allow_resume_mismatch true if the change is deliberate."
        )
    print(f"resuming from {checkpoint} although its run differs ({listing}), as --allow_resume_mismatch allows",
          file=sys.stderr)


class IdentityInCheckpoints(TrainerCallback):
    """Writes the run identity into each checkpoint folder before the Trainer saves into it.

    `on_step_end` / `on_epoch_end` run after the Trainer's flow callback has decided to save and
    before the save, whose `trainer_state.json` comes last: a complete checkpoint has its identity.
    `on_save` covers a save decided later (`save_strategy best`).
    """

    def __init__(self, identity: dict):
        self.identity = identity

    def _write(self, args, state) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(self.identity, folder / IDENTITY_FILE)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._write(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._write(args, state)

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)


def hold_output_dir(output_dir: Path, is_main: bool) -> OutputLock | None:
    """The lock of a training output_dir, taken by the run's first process only (the others follow it)."""
    if not is_main:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    return OutputLock(output_dir, 0, command="wspo-train", name=".lock-train")
