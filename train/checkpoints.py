"""Interrupted writes never look finished (DESIGN section 7).

- `resolve_resume`: `--resume_from_checkpoint true` takes the newest *complete* `checkpoint-N`
  (trainer state, weights and optimizer state present and readable), saying which it took and
  which incomplete ones it skipped (a kill while the Trainer writes a checkpoint leaves one).
- `publish_final`: the final model is saved into a hidden folder first and its files are moved
  into `output_dir` only when all are written, weights last, so a full disk or a kill never
  leaves complete-looking weights next to a truncated tokenizer or config.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from wspo.disk import DiskError, disk_message
from wspo.errors import ConfigError

WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPTIMIZER = ("optimizer.pt", "optimizer.bin")
FINAL_TMP = ".final-partial"


def checkpoint_problem(folder: Path) -> str | None:
    """What makes a checkpoint folder unusable, or None when it is complete."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable"
    deepspeed = list(folder.glob("global_step*"))
    weights = [folder / w for w in WEIGHTS if (folder / w).exists()]
    if not weights and not deepspeed:
        return "no weights"
    for path in weights:
        if path.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    names = list(f.keys())
                expected = path.stat().st_size
                if not names or expected < 8:
                    return f"{path.name} is empty"
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for a cut file
                return f"{path.name} is unreadable ({type(e).__name__})"
    if not deepspeed and not any((folder / o).exists() and (folder / o).stat().st_size > 0 for o in OPTIMIZER):
        return "no optimizer state"
    return None


def resolve_resume(resume, output_dir: str) -> str | bool | None:
    """The checkpoint to resume from: a named folder (checked), or the newest complete one for `true`."""
    if resume in (None, False, "", "false", "False"):
        return None
    if isinstance(resume, str) and resume.lower() not in ("true", "last", "latest"):
        problem = checkpoint_problem(Path(resume)) if Path(resume).is_dir() else "no such folder"
        if problem:
            raise ConfigError(f"resume_from_checkpoint {resume}: not a complete checkpoint ({problem})")
        return resume
    folders = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                     key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    skipped = []
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            note = f" (skipped incomplete: {'; '.join(skipped)})" if skipped else ""
            print(f"resuming from {folder}{note}", file=sys.stderr)
            return str(folder)
        skipped.append(f"{folder.name}: {problem}")
    raise ConfigError(
        f"resume_from_checkpoint true: no complete checkpoint in {output_dir}"
        + (f" (incomplete: {'; '.join(skipped)})" if skipped else " (none written yet)")
    )


def publish_final(trainer, output_dir: str) -> None:
    """Save the final model and tokenizer into a hidden folder, then move the files into place."""
    out = Path(output_dir)
    tmp = out / FINAL_TMP
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(tmp))
    except Exception as e:  # a full disk, a quota (OSError, or a safetensors error): nothing reaches output_dir
        shutil.rmtree(tmp, ignore_errors=True)
        disk = disk_message(e, tmp, "rerun the same command (with --resume_from_checkpoint true to go on from the newest "
                                    "complete checkpoint)")
        if disk is None and not isinstance(e, OSError):
            raise
        raise DiskError(f"could not write the final model to {out}; nothing was published there (checkpoints are kept): "
                        f"{disk or e}") from None
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        move_into(tmp, out)
    trainer.accelerator.wait_for_everyone()


def move_into(tmp: Path, out: Path) -> None:
    """Move a whole saved model from `tmp` into `out`, weights last (a model folder with weights
    is a whole one), then drop `tmp`."""
    files = sorted((p for p in tmp.iterdir() if p.is_file()), key=lambda p: p.name in WEIGHTS or p.suffix == ".safetensors")
    for path in files:
        path.replace(out / path.name)
    shutil.rmtree(tmp, ignore_errors=True)
