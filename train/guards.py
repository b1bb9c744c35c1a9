"""Non-finite training results are never published as finished (DESIGN section 7).

`NonFiniteGuard` stops the run at the first optimizer step whose gradients hold NaN or inf (a NaN
loss gives NaN gradients), and at the first logged loss or gradient norm that is not finite (the
check that also covers DeepSpeed, whose gradients live inside its engine). The error names the
step; the final model is then never written, and checkpoints saved before stay as they are.

`ExactFloatInputs`, a base of WSPOTrainer, keeps the batch values whose precision matters (WSPO
rewards, reference log-probs from shards) in float32 under DeepSpeed's bf16 / fp16.
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


# Batch values whose precision matters: under DeepSpeed the stock `_prepare_inputs` casts every
# floating-point tensor to the engine's dtype (bf16 would round a log-prob of -7.6 by 0.03 and a
# summed reference of a long response by whole units). These keep float32 and only move device.
EXACT_FLOAT_KEYS = ("ref_logps", "rewards")  # WSPO rewards, reference log-probs from shards


class ExactFloatInputs:
    """A Trainer mixin: the batch's `EXACT_FLOAT_KEYS` skip the stock Trainer's cast to the
    DeepSpeed dtype (in bf16 it would round rewards and shard log-probs to ~3 significant
    digits); they stay float32 and only move to the device."""

    def _prepare_inputs(self, inputs):
        exact = {k: inputs[k] for k in EXACT_FLOAT_KEYS if k in inputs}
        prepared = super()._prepare_inputs({k: v for k, v in inputs.items() if k not in exact})
        prepared.update({k: v.to(self.args.device) for k, v in exact.items()})
        return prepared
