"""The training objectives as pure functions of tensors (DESIGN sections 1 and 5).

Every tensor here is *flat*: the response tokens of a whole batch one after the other, row 0's
tokens first (the order `wspo.logprobs.response_logprobs` returns). Which sequence a value belongs
to is given by an index tensor, and per-sequence sums use `index_add_`, so no padding enters.

The WSPO loss is written over *segments*. A segment is the unit at which the weak reward and the
strong log-ratio are compared:

- same tokenizer in both phases (this issue): each response token is its own segment;
- different tokenizers (issue 4): a segment is a chunk of characters where both tokenizations
  have a boundary; the strong log-ratio of a chunk is the sum over its strong tokens and its
  reward the sum of its weak token rewards (computed by the data step, since rewards are data).

With one segment per token the formula is exactly DESIGN section 1.

DPO and WRPO (`dpo_loss`, `wrpo_loss`) take one value per *response*: its token log-probs summed
(`segment_sums` over the sequence index), under the policy and under the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sums(values: torch.Tensor, segment_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """out[s] = sum of values[i] over every i with segment_ids[i] == s (differentiable)."""
    out = values.new_zeros(n_segments)
    return out.index_add(0, segment_ids, values)


def wspo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    seq_ids: torch.Tensor,
    n_seqs: int,
    gamma: float,
    token_segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """WSPO: mean over sequences of  1/S_y * sum_s (gamma * logratio_s - r_s)^2.

    policy_logps, ref_logps: [T] log-probs of the strong response tokens under the policy and the
        strong reference (the reference carries no gradient).
    rewards: [S] weak reward of each segment.
    seq_ids: [S] the sequence (0 .. n_seqs-1) each segment belongs to.
    token_segments: [T] the segment of each strong token; None means one segment per token
        (then S = T and this is DESIGN section 1 token for token).

    Returns the scalar loss. Every sequence counts equally, however long it is, as in the
    authors' code (squared per token, divided by the sequence's number of tokens).
    """
    return wspo_sequence_losses(policy_logps, ref_logps, rewards, seq_ids, n_seqs, gamma, token_segments).mean()


def wspo_sequence_losses(policy_logps, ref_logps, rewards, seq_ids, n_seqs: int, gamma: float,
                         token_segments: torch.Tensor | None = None) -> torch.Tensor:
    """[n_seqs] each sequence's term of `wspo_loss` (its mean squared error over segments)."""
    logratio = policy_logps - ref_logps
    if token_segments is not None:
        logratio = segment_sums(logratio, token_segments, rewards.shape[0])
    squared = (gamma * logratio - rewards) ** 2
    per_seq_sum = segment_sums(squared, seq_ids, n_seqs)
    per_seq_count = segment_sums(torch.ones_like(squared), seq_ids, n_seqs)
    return per_seq_sum / per_seq_count


def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of the response tokens.

    Averaged per token over the whole micro-batch (long responses weigh more), like the
    Hugging Face causal-LM loss, not per sequence as in `wspo_loss`.
    """
    return -policy_logps.mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Sigmoid DPO: mean over pairs of  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).

    Every argument is [pairs]: a response's log-probs summed over its tokens, under the policy
    (with gradient) or the reference (without). The implicit reward of a response is
    beta * (pi - ref); see `implicit_rewards`.
    """
    return dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta).mean()


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """[pairs] each pair's term of `dpo_loss`."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def wrpo_loss(
    policy_source: torch.Tensor,
    policy_target: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_source: torch.Tensor,
    ref_target: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """WRPO: mean over triples of  -log sigmoid(beta * (alpha * D(y_ws) + (1 - alpha) * D(y_wt) - D(y_l))),

    D(y) = pi(y) - ref(y), the summed log-ratio of policy to reference; y_ws the source models'
    chosen response, y_wt the target model's chosen response, y_l the rejected one. Arguments as
    in `dpo_loss`; alpha = 0 is DPO on (y_wt, y_l).
    """
    return wrpo_losses(policy_source, policy_target, policy_rejected, ref_source, ref_target, ref_rejected, beta, alpha).mean()


def wrpo_losses(policy_source, policy_target, policy_rejected, ref_source, ref_target, ref_rejected, beta: float,
                alpha: float) -> torch.Tensor:
    """[triples] each triple's term of `wrpo_loss`."""
    chosen = alpha * (policy_source - ref_source) + (1.0 - alpha) * (policy_target - ref_target)
    return -F.logsigmoid(beta * (chosen - (policy_rejected - ref_rejected)))


def implicit_rewards(policy_sums: torch.Tensor, ref_sums: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (pi - ref) per response (no gradient): the rewards DPO-style losses compare."""
    return beta * (policy_sums.detach() - ref_sums)


def wrpo_alpha(step: int, max_steps: int, alpha_max: float, schedule: str = "linear") -> float:
    """The WRPO weight at optimizer step `step` (0-based, `TrainerState.global_step` while the
    step's micro-batches run), as in the WRPO authors' code: alpha = alpha_max * step / N with N the
    number of optimizer steps, so 0 at the first step and alpha_max * (N - 1) / N at the last;
    training never reaches alpha_max. After the last step (evaluation at the end, step = N) it is
    alpha_max; schedule 'fixed' is alpha_max throughout.
    """
    if schedule == "fixed" or max_steps < 1:
        return float(alpha_max)
    if schedule != "linear":
        raise ValueError(f"unknown wrpo_alpha_schedule {schedule!r}")
    return float(alpha_max) * min(1.0, max(0, step) / max_steps)


def pearson_sums_by(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """[n, 6] per group (x[i], y[i] belong to group index[i]): [count, sum x, sum y, sum x^2,
    sum y^2, sum xy] in float64, sufficient statistics that add up across groups, steps and
    ranks, so the logged correlation is exact over every token of a log period."""
    x, y = x.detach().double(), y.detach().double()
    columns = (torch.ones_like(x), x, y, x * x, y * y, x * y)
    return torch.stack([segment_sums(c, index, n) for c in columns], dim=1)


def pearson_from_sums(sums: torch.Tensor) -> float:
    n, sx, sy, sxx, syy, sxy = sums.tolist()
    if n < 2:
        return float("nan")
    cov = sxy - sx * sy / n
    var_x = sxx - sx * sx / n
    var_y = syy - sy * sy / n
    if var_x <= 0 or var_y <= 0:
        return float("nan")
    return cov / (var_x * var_y) ** 0.5


def kd_token_losses(student_topk_logps: torch.Tensor, teacher_topk_logps: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """[T] forward KL(teacher || student) at each response position, over K + 1 categories: the
    teacher's K most likely ids (stored in phase one) and one bucket for the rest of the
    vocabulary.

    teacher_topk_logps: [T, K] the teacher's log-probs of its top-k ids (no gradient).
    student_topk_logps: [T, K] the student's log-probs of the same ids (a full-vocabulary
        log-softmax, gathered: `response_logprobs(..., gather_ids=ids)`).

    Each side's bucket is the mass outside the K ids, log(1 - sum_k p_k). With temperature T the
    (K + 1)-category distributions of both sides are softened, log_softmax(categories / T), and
    the KL is multiplied by T^2 (Hinton et al.), so gradient scales stay comparable across T;
    T = 1 is the plain bucketed KL.
    """
    teacher = _with_bucket(teacher_topk_logps.float())
    student = _with_bucket(student_topk_logps.float())
    if temperature != 1.0:
        teacher = torch.log_softmax(teacher / temperature, dim=-1)
        student = torch.log_softmax(student / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1) * temperature**2


def _with_bucket(topk_logps: torch.Tensor) -> torch.Tensor:
    """[T, K + 1]: the K log-probs and the log of the remaining mass, log(1 - exp(logsumexp)),
    floored at the smallest float32 (a teacher whose stored top-k sums to 1 within rounding)."""
    inside = torch.logsumexp(topk_logps, dim=-1)
    rest = torch.log(torch.clamp(-torch.expm1(inside), min=torch.finfo(torch.float32).tiny))
    return torch.cat([topk_logps, rest[:, None]], dim=-1)


def kd_loss(policy_logps: torch.Tensor, student_topk_logps: torch.Tensor, teacher_topk_logps: torch.Tensor,
            temperature: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Distillation: alpha * mean over response tokens of the bucketed KL (`kd_token_losses`) +
    (1 - alpha) * the SFT loss on the actual tokens (`sft_loss`, policy_logps [T]). Per token over
    the micro-batch, like `sft_loss`."""
    kl = kd_token_losses(student_topk_logps, teacher_topk_logps, temperature).mean()
    if alpha == 1.0:
        return kl
    return alpha * kl + (1.0 - alpha) * sft_loss(policy_logps)
