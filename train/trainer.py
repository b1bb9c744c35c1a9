"""A thin `transformers.Trainer` subclass: the WSPO / SFT loss from shard batches (DPO and WRPO:
`preference.PreferenceMixin`, which `compute_loss` routes to).

Everything else (optimizer, schedule, gradient accumulation, DDP / DeepSpeed, checkpoints,
resuming, `report_to`) is the stock Trainer. What this class adds:

- `compute_loss`: policy log-probs at response positions, reference log-probs without gradient,
  then a pure loss function from `losses.py`;
- the strong reference: with LoRA, the policy itself with its adapters disabled (one model in
  memory); with full fine-tuning, a frozen copy, wrapped by DeepSpeed like the policy when
  DeepSpeed is on (ZeRO-3 partitions it across ranks too); or, with `reference_from_shards`,
  log-probs scored in phase one that arrive in the batch (`ref_logps`): no reference forward;
- extra logged values: mean weak reward, mean scaled strong log-ratio (gamma * logratio), their
  per-token Pearson correlation, tokens/s; summed over every micro-batch and rank of a log period;
- held-out metrics (eval_loss included) over the held-out set counted once per example, however
  many processes evaluate it (held_out.py): eval_loss is the loss of the whole held-out set as
  one batch.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from peft import PeftModel
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from wspo.errors import ConfigError
from wspo.logprobs import response_logprobs
from wspo.models import compile_decoder

from .guards import ExactFloatInputs
from .held_out import HeldOutLedger
from .losses import kd_loss, kd_token_losses, pearson_from_sums, pearson_sums_by, segment_sums, sft_loss, wspo_sequence_losses
from .preference import PreferenceMixin


class WSPOTrainer(ExactFloatInputs, PreferenceMixin, Trainer):
    # compute_loss returns the mean over one micro-batch; the Trainer divides by the number of
    # gradient-accumulation steps, so the step's loss is the mean over its micro-batches.
    loss_is_scaled_for_ga = False

    def __init__(self, model, args, *, loss: str = "wspo", gamma: float = 0.1, ref_model: torch.nn.Module | None = None,
                 reference_from_shards: bool = False, beta: float = 0.1, wrpo_alpha: float = 0.1,
                 wrpo_alpha_schedule: str = "linear", kd_alpha: float = 1.0, kd_temperature: float = 1.0, **kwargs):
        # Batches carry keys the model's forward does not take (target_mask, rewards, ...); the
        # Trainer must not drop them.
        args.remove_unused_columns = False
        super().__init__(model=model, args=args, **kwargs)
        self.loss_name = loss
        self.gamma = gamma
        self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
        self._init_preference(loss, beta, wrpo_alpha, wrpo_alpha_schedule)  # dpo / wrpo (preference.py)
        self.uses_lora = isinstance(self.model, PeftModel)
        self.reference_from_shards = reference_from_shards
        if loss == "wspo" and not self.uses_lora and ref_model is None and not reference_from_shards:
            raise ConfigError("loss wspo with full fine-tuning needs ref_model (a frozen copy of the strong model) or reference_from_shards")
        self.ref_model = self._prepare_ref_model(ref_model) if ref_model is not None and not self.uses_lora else None
        if loss in ("sft", "kd"):
            self.reference_kind = None
        elif self.is_preference_loss:
            self.reference_kind = "logp_ref from shards"
        elif reference_from_shards:
            self.reference_kind = "logp_strong_ref from shards"
        elif self.uses_lora:
            self.reference_kind = "policy with adapters disabled"
        else:
            self.reference_kind = "frozen copy" + (" (DeepSpeed engine)" if self.is_deepspeed_enabled else "")
        # Training: [n, sum r, sum g*lr, sum r^2, sum (g*lr)^2, sum r*g*lr] and response tokens
        # of the log period. Evaluation: one row per held-out example (held_out.py).
        self._sums = torch.zeros(6, dtype=torch.float64)
        self._tokens = 0
        self.held_out = HeldOutLedger()
        self._period_start = time.perf_counter()

    # -- the reference model --

    def _prepare_ref_model(self, ref_model: torch.nn.Module) -> torch.nn.Module:
        ref_model.eval()
        ref_model.requires_grad_(False)
        if not self.is_deepspeed_enabled:
            if self.args.torch_compile:  # the Trainer compiles the policy; compile the frozen copy's forward alike
                compile_decoder(ref_model, backend=self.args.torch_compile_backend or "inductor",
                                mode=self.args.torch_compile_mode)
            return ref_model.to(self.args.device)
        # Under DeepSpeed the frozen copy gets its own inference engine from the policy's config:
        # ZeRO-3 partitions its weights across ranks like the policy's; ZeRO-1/2 only partition
        # optimizer state and gradients, which a frozen model has none of, so it runs at stage 0.
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        zero = config.get("zero_optimization", {})
        if zero.get("stage") == 3:
            # These "auto" values are filled from the model only when training starts; the
            # reference is prepared now, so fill them the same way (hidden size based).
            hidden = ref_model.config.hidden_size
            for key, value in (
                ("reduce_bucket_size", hidden * hidden),
                ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                ("stage3_param_persistence_threshold", 10 * hidden),
            ):
                if zero.get(key) == "auto":
                    zero[key] = value
        else:
            config["zero_optimization"] = {"stage": 0}
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()
        return engine

    def _reference_context(self, model: torch.nn.Module):
        """LoRA: run the policy with its adapters off. Full fine-tuning: nothing to switch."""
        if self.uses_lora:
            return self.accelerator.unwrap_model(model).disable_adapter()
        return contextlib.nullcontext()

    # -- batches --

    def _get_train_sampler(self, train_dataset=None):
        """`--train_sampling_strategy group_by_length`: the stock LengthGroupedSampler, given the
        lengths our datasets know without building every example (rows.py reads them from the
        Arrow columns); the stock path would build each example once to measure it."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    # -- the loss --

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Padded batches carry attention_mask; packed ones position_ids instead (packing.py).
        ids, mask, target = inputs["input_ids"], inputs.get("attention_mask"), inputs["target_mask"]
        positions = inputs.get("position_ids")
        row_index = inputs["row_index"]
        n_seqs = row_index.shape[0]  # sequences, not rows: a packed row holds several
        mode = "train" if model.training else "eval"
        if mode == "train":
            self._tokens += int(target.sum())
        if self.is_preference_loss:  # dpo / wrpo: preference.py
            loss = self.preference_loss(model, inputs, mode)
            return (loss, {}) if return_outputs else loss
        if self.loss_name == "kd":
            loss = self.distillation_loss(model, inputs, mode)
            return (loss, {}) if return_outputs else loss
        policy_logps = response_logprobs(model, ids, mask, target, position_ids=positions)
        if self.loss_name == "sft":
            loss = sft_loss(policy_logps)
            if mode == "eval":  # per example: summed negative log-likelihood, tokens
                seq_ids = inputs["seq_ids"]
                nll = segment_sums(-policy_logps.detach().double(), seq_ids, n_seqs)
                tokens = torch.bincount(seq_ids, minlength=n_seqs).double()
                self.held_out.add(row_index, torch.stack([nll, tokens], 1))
        else:
            if self.reference_from_shards:
                ref_logps = inputs["ref_logps"].float()
            else:
                with torch.no_grad(), self._reference_context(model):
                    ref_logps = response_logprobs(self.ref_model if self.ref_model is not None else model, ids, mask, target,
                                                  position_ids=positions)
            rewards = inputs["rewards"].float()
            # Reward projection: one segment per chunk of strong tokens; else one per token.
            segments = inputs.get("token_segments")
            seq_of_segment = inputs.get("segment_seq_ids", inputs["seq_ids"])
            per_seq_loss = wspo_sequence_losses(policy_logps, ref_logps, rewards, seq_of_segment, n_seqs, self.gamma,
                                                token_segments=segments)
            loss = per_seq_loss.mean()  # losses.wspo_loss
            logratio = policy_logps.detach() - ref_logps
            if segments is not None:
                logratio = segment_sums(logratio, segments, rewards.shape[0])
            per_seq = pearson_sums_by(rewards, self.gamma * logratio, seq_of_segment, n_seqs)
            if mode == "eval":  # per example: its loss term, its pearson sums
                self.held_out.add(row_index, torch.cat([per_seq_loss.detach().double()[:, None], per_seq], 1))
            else:
                self._sums += per_seq.sum(0).cpu()
        return (loss, {}) if return_outputs else loss

    def distillation_loss(self, model, inputs, mode: str) -> torch.Tensor:
        """--loss kd (losses.kd_loss): the student's log-probs of the actual tokens and of the
        teacher's stored top-k ids, from the same output-head chunks."""
        policy_logps, student_topk = response_logprobs(model, inputs["input_ids"], inputs.get("attention_mask"),
                                                       inputs["target_mask"], position_ids=inputs.get("position_ids"),
                                                       gather_ids=inputs["topk_ids"])
        teacher = inputs["teacher_topk_logps"].float()
        if mode == "eval":  # per example: summed loss, summed KL, tokens
            with torch.no_grad():
                kl = kd_token_losses(student_topk, teacher, self.kd_temperature)
                per_token = self.kd_alpha * kl + (1.0 - self.kd_alpha) * -policy_logps
                seq_ids, n_seqs = inputs["seq_ids"], inputs["row_index"].shape[0]
                sums = [segment_sums(v.double(), seq_ids, n_seqs) for v in (per_token, kl)]
                tokens = torch.bincount(seq_ids, minlength=n_seqs).double()
                self.held_out.add(inputs["row_index"], torch.stack([*sums, tokens], 1))
        return kd_loss(policy_logps, student_topk, teacher, self.kd_temperature, self.kd_alpha)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- logging --

    def train(self, *args, **kwargs):
        self._period_start = time.perf_counter()
        return super().train(*args, **kwargs)

    @staticmethod
    def _reward_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """WSPO's logged reward values from summed `pearson_sums_by` rows."""
        n = sums[0].item()
        if n == 0:
            return {}
        return {f"{prefix}reward_mean": sums[1].item() / n, f"{prefix}scaled_logratio_mean": sums[2].item() / n,
                f"{prefix}reward_logratio_pearson": pearson_from_sums(sums)}

    def _period_metrics(self) -> dict[str, float]:
        """The training log period's extra values, summed over ranks, then reset.

        Every rank calls `log` at the same points (the Trainer gathers the loss there too), so
        the reduction below is a collective every rank joins.
        """
        totals = torch.cat([self._sums, torch.tensor([float(self._tokens)], dtype=torch.float64)])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()
        sums, tokens = totals[:6], totals[6].item()
        self._sums.zero_()
        self._tokens = 0
        metrics = self._reward_metrics(sums) if self.loss_name == "wspo" else {}
        now = time.perf_counter()
        metrics["response_tokens_per_second"] = tokens / max(now - self._period_start, 1e-9)
        self._period_start = now
        return metrics

    def _held_out_metrics(self, prefix: str) -> dict[str, float]:
        """<prefix>loss and the held-out values, each held-out example counted once
        (held_out.py); a collective, like `_period_metrics`."""
        n, totals = self.held_out.totals(self.accelerator)
        if n == 0:
            return {}
        if self.loss_name == "sft":  # per token over the held-out set
            return {f"{prefix}loss": totals[0] / totals[1]}
        if self.loss_name == "kd":  # per token: the loss, and the KL to the teacher alone
            return {f"{prefix}loss": totals[0] / totals[2], f"{prefix}kd_kl": totals[1] / totals[2]}
        metrics = {f"{prefix}loss": totals[0] / n}  # mean over examples of their loss terms
        if self.is_preference_loss:
            return metrics | self._preference_metrics_of(torch.from_numpy(totals[1:]), prefix)
        return metrics | self._reward_metrics(torch.from_numpy(totals[1:7]), prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The end of an evaluation logs "<prefix>_loss" (eval_, eval_<name>_ for several
        # evaluation sets, test_ from predict); the end of training "train_loss", no evaluation.
        evaluated = next((k for k in logs if k.endswith("_loss") and k != "train_loss"), None)
        if "loss" in logs:
            logs.update(self._period_metrics())
        elif evaluated is not None:  # replaces the stock value, which counts repeated examples
            logs.update(self._held_out_metrics(evaluated.removesuffix("loss")))
        super().log(logs, start_time)
