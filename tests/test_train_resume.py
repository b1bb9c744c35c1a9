"""Checkpoints and `resume_from_checkpoint`: a run stopped at a checkpoint and resumed ends with
the same weights as a run that was never interrupted."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import train_argv, train_setup  # noqa: F401  (fixture)
from transformers import TrainerCallback

STEPS, STOP_AT = 6, 3


class StopAt(TrainerCallback):
    """Ends training right after step `step` (its checkpoint is written first), like a kill
    between two steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def train(setup, output_dir, callbacks=None, **keys) -> dict:
    from transformers import TrainingArguments

    from wspo.args import parse_config
    from wspo.train.config import WSPOArguments
    from wspo.train.pipeline import run

    argv = train_argv(setup, output_dir, max_steps=STEPS, save_strategy="steps", save_steps=STOP_AT,
                      lr_scheduler_type="cosine", warmup_steps=2, **keys)
    args, training_args = parse_config([WSPOArguments, TrainingArguments], [str(a) for a in argv])
    return run(args, training_args, callbacks=callbacks)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", ["false", "true"])
def test_resume_ends_with_the_same_weights(train_setup, tmp_path, use_lora):  # noqa: F811
    """Tolerance 1e-6 (absolute, per weight): the resumed run replays the same batches with the
    restored optimizer, scheduler and RNG states, so on CPU it is in fact bit-identical."""
    weights = "adapter_model.safetensors" if use_lora == "true" else "model.safetensors"
    lr = 1e-2 if use_lora == "true" else 1e-3

    straight = train(train_setup, tmp_path / "straight", use_lora=use_lora, learning_rate=lr)

    stopped = train(train_setup, tmp_path / "stopped", callbacks=[StopAt(STOP_AT)], use_lora=use_lora, learning_rate=lr)
    assert stopped["log_history"][-1]["step"] == STOP_AT
    checkpoint = tmp_path / "stopped" / f"checkpoint-{STOP_AT}"
    assert (checkpoint / weights).exists() and (checkpoint / "optimizer.pt").exists()

    resumed = train(train_setup, tmp_path / "stopped", use_lora=use_lora, learning_rate=lr,
                    resume_from_checkpoint=checkpoint)
    assert resumed["log_history"][-1]["step"] == STEPS

    a = load_file(str(tmp_path / "straight" / weights))
    b = load_file(str(tmp_path / "stopped" / weights))
    start = load_file(str(checkpoint / weights))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # steps 4-6 moved the weights
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    losses = lambda record: [h["loss"] for h in record["log_history"] if "loss" in h]  # noqa: E731
    assert losses(resumed)[-STEPS + STOP_AT:] == pytest.approx(losses(straight)[STOP_AT:], abs=1e-6)
