"""DPO and WRPO inside `WSPOTrainer`: the loss from a preference batch, and TRL-style logs.

A mixin, so `trainer.py` only routes to it. Batches come from `pairs.PreferenceCollator`: the
responses of each example in slot order, the reference's per-token log-probs (`ref_logps`, read
from the shards) beside them. Per response, policy and reference log-probs are summed in float64
(`segment_sums`), reshaped to [examples, slots], and handed to a pure loss from `losses.py`.

WRPO's alpha follows `losses.wrpo_alpha` at `state.global_step`, which the Trainer advances once
per optimizer step: all micro-batches of one accumulated step use the same alpha.

Logged (per log period, summed over micro-batches and ranks; `eval_` prefix in evaluation, where
each held-out example counts once: held_out.py), with
implicit reward r(y) = beta * (pi(y) - ref(y)) summed over the response:
    rewards/<slot>, logps/<slot>   mean per response of each slot
    rewards/chosen                 wrpo: alpha * r(y_ws) + (1 - alpha) * r(y_wt)
    rewards/margins                mean of chosen - rejected (the loss's sigmoid argument)
    rewards/accuracies             fraction of examples with chosen > rejected
    wrpo_alpha                     wrpo: the alpha of the last micro-batch of the period
"""

from __future__ import annotations

import torch

from wspo.logprobs import response_logprobs

from . import losses
from .config import PREFERENCE_LOSSES
from .losses import implicit_rewards, segment_sums
from .pairs import PREFERENCE_SLOTS


class PreferenceMixin:
    def _init_preference(self, loss: str, beta: float, wrpo_alpha: float, wrpo_alpha_schedule: str) -> None:
        self.beta = beta
        self.wrpo_alpha_max = wrpo_alpha
        self.wrpo_alpha_schedule = wrpo_alpha_schedule
        self.preference_slots = PREFERENCE_SLOTS.get(loss, ())
        k = len(self.preference_slots)
        # Training log period: [examples, correct, sum margin, sum r per slot (k), sum logp per slot (k)].
        self._pref_sums = torch.zeros(3 + 2 * k, dtype=torch.float64)
        self._pref_alpha = {"train": None, "eval": None}

    @property
    def is_preference_loss(self) -> bool:
        return self.loss_name in PREFERENCE_LOSSES

    def current_wrpo_alpha(self) -> float:
        """The alpha of the optimizer step now running (see `losses.wrpo_alpha`)."""
        return losses.wrpo_alpha(self.state.global_step, self.state.max_steps, self.wrpo_alpha_max, self.wrpo_alpha_schedule)

    def preference_loss(self, model, inputs, mode: str) -> torch.Tensor:
        ids, target, seq_ids = inputs["input_ids"], inputs["target_mask"], inputs["seq_ids"]
        k = len(self.preference_slots)
        n_seqs = inputs["row_index"].shape[0] * k  # sequences, not rows: a packed row holds several
        # Padded batches carry attention_mask; packed ones position_ids instead (packing.py).
        policy_logps = response_logprobs(model, ids, inputs.get("attention_mask"), target,
                                         position_ids=inputs.get("position_ids"))
        # float64 sums: a long response's summed log-prob is in the thousands, and DPO compares
        # differences of such sums.
        pol = segment_sums(policy_logps.double(), seq_ids, n_seqs).view(-1, k)
        ref = segment_sums(inputs["ref_logps"].double(), seq_ids, n_seqs).view(-1, k)
        rewards = implicit_rewards(pol, ref, self.beta)  # [examples, k]
        if self.loss_name == "dpo":
            per_example = losses.dpo_losses(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.beta)
            chosen = rewards[:, 0]
        else:
            alpha = self.current_wrpo_alpha()
            self._pref_alpha[mode] = alpha
            per_example = losses.wrpo_losses(pol[:, 0], pol[:, 1], pol[:, 2], ref[:, 0], ref[:, 1], ref[:, 2], self.beta, alpha)
            chosen = alpha * rewards[:, 0] + (1.0 - alpha) * rewards[:, 1]
        margin = chosen - rewards[:, -1]
        # Per example: [1, correct, margin, r per slot (k), logp per slot (k)].
        stats = torch.cat([torch.ones_like(margin)[:, None], (margin > 0).double()[:, None], margin[:, None], rewards,
                           pol.detach()], dim=1)
        if mode == "eval":  # with its loss term, one row per held-out example
            self.held_out.add(inputs["row_index"], torch.cat([per_example.detach()[:, None], stats], 1))
        else:
            self._pref_sums += stats.sum(0).cpu()
        return per_example.mean().float()  # losses.dpo_loss / wrpo_loss

    def _preference_metrics(self) -> dict[str, float]:
        """The training log period's DPO/WRPO values, summed over ranks (every rank logs at the
        same points), then reset."""
        sums = self._pref_sums.clone()  # the accumulator is reset below
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
        self._pref_sums.zero_()
        return self._preference_metrics_of(sums, "")

    def _preference_metrics_of(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        """The logged values from summed per-example statistics (see `preference_loss`)."""
        n = sums[0].item()
        if n == 0:
            return {}
        k = len(self.preference_slots)
        mode = "eval" if prefix else "train"  # any evaluation prefix (eval_, test_, ...)
        metrics = {
            f"{prefix}rewards/accuracies": sums[1].item() / n,
            f"{prefix}rewards/margins": sums[2].item() / n,
        }
        for j, slot in enumerate(self.preference_slots):
            metrics[f"{prefix}rewards/{slot}"] = sums[3 + j].item() / n
            metrics[f"{prefix}logps/{slot}"] = sums[3 + k + j].item() / n
        if self.loss_name == "wrpo":
            metrics[f"{prefix}rewards/chosen"] = metrics[f"{prefix}rewards/margins"] + metrics[f"{prefix}rewards/rejected"]
            if self._pref_alpha[mode] is not None:
                metrics[f"{prefix}wrpo_alpha"] = self._pref_alpha[mode]
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.is_preference_loss and "loss" in logs:  # evaluation: WSPOTrainer._held_out_metrics
            logs.update(self._preference_metrics())
        super().log(logs, start_time)
