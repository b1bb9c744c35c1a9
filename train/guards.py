"""Non-finite training results are never published as finished (DESIGN section 7).

`NonFiniteGuard` stops the run at the first optimizer step whose gradients hold NaN or inf (a NaN
loss gives NaN gradients), and at the first logged loss or gradient norm that is not finite (the
check that also covers DeepSpeed, whose gradients live inside its engine). The error names the
step; the final model is then never written, and checkpoints saved before stay as they are.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from wspo.errors import NonFiniteError


class NonFiniteTrainingError(NonFiniteError, ValueError):
    """Training produced a NaN or infinite loss or gradient."""


def _stop(step: int, what: str, args) -> NonFiniteTrainingError:
    return NonFiniteTrainingError(
        f"training stopped at step {step}: the {what} is NaN or infinite. No final model was written to "
        f"{args.output_dir} (checkpoints saved before step {step} are kept). Check the learning rate "
        f"({args.learning_rate:g}), gamma/beta and the precision settings."
    )


class NonFiniteGuard(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not all(bool(torch.isfinite(g).all()) for g in grads):
            raise _stop(state.global_step + 1, "gradient", args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise _stop(state.global_step, "loss" if key == "loss" else "gradient norm", args)
