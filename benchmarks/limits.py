"""The yardstick of every benchmark: useful FLOPs of a phase's work, and the machine's matmul rate.

DESIGN section 9: the limit of phase one is each scored sequence through its scorer's body once,
unpadded, plus the output head and a log-softmax at response positions only; of phase two, the
policy's forward and backward over the same tokens (plus the strong reference's forward when it
is not read from shards). A benchmark divides the seconds that work would take at the measured
matmul rate by the seconds it took: the fraction of the limit.

The API (stable; `benchmarks/gpu_suite.sh` and every benchmark here use it):

    from limits import Ceiling, config_for, phase_one_flops, phase_two_flops

    config = config_for("qwen2-0.5b")                     # or any transformers config (Qwen2/Llama-shaped)
    work = phase_one_flops(config, sequence_lengths, response_lengths)     # {gemm kind: FLOPs}
    ceiling = Ceiling.measure(config, torch.float32, "cpu", kinds=work)   # rates at the model's shapes
    ceiling = Ceiling.best_of(ceiling, Ceiling.measure(...))         # measured again after the work
    ceiling.seconds(work)          # the limit: seconds of `work` at the measured (fastest) rates
    ceiling.fraction(work, took)   # limit / measured seconds, in (0, 1] when below the ceiling
    ceiling.as_dict()              # JSON-ready: dtype, device, threads, FLOP/s per GEMM kind

Conventions. A FLOP is one multiply or one add (a [m, k] x [k, n] matmul is 2mkn). Only matmuls
are counted: norms, activations, rotary embeddings, the log-softmax's exponentials and the
optimizer step are elementwise, cost time, and so lower the fraction honestly. Attention counts
its causal half (QK^T and PV over keys <= query, per sequence, never across packed neighbours or
pads). The MLP is gated (gate, up, down: Qwen2, Llama, Mistral). Backward: every matmul's input
gradient (same FLOPs as its forward) plus its weight gradient (the same again) where the weight
trains; frozen weights (LoRA's base, a frozen reference) need no weight gradient; attention's
backward is twice its forward. The first layer's q/k/v input gradient only reaches the
embeddings (a scatter, not a matmul) and is not counted (nor, under LoRA, the
first layer's q/k/v adapter A input gradient). tests/test_benchmarks.py checks these counts
against torch.utils.flop_counter on a tiny Qwen2. Work dicts are keyed by GEMM kind:
"linear:INxOUT" (y = x W^T), "dgrad:INxOUT" (dx = dy W), "wgrad:INxOUT" (dW = dy^T x), "attention";
the output head is the kind whose shape is hidden x vocab (its rows are one head chunk).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

# Qwen2-shaped presets (random weights are built from these; the vocabulary is Qwen2's real one).
# "qwen2-26m" is train_vs_reference.py's `cpu-strong` with Qwen2's vocabulary swapped for the
# tiny one by the caller if it wants; "quick" is the a-few-minutes shape.
PRESETS = {
    "qwen2-26m": dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "tiny-2k": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),  # the suite's slow tests
    "tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),  # the suite's slow tests
    "quick": dict(vocab_size=151936, hidden_size=512, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
BODY_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config_for(preset: str, **overrides):
    """A transformers `Qwen2Config` of one of `PRESETS` (keys overridable, e.g. vocab_size)."""
    from transformers import Qwen2Config

    shape = {**PRESETS[preset], **overrides}
    return Qwen2Config(head_dim=shape["hidden_size"] // shape["num_attention_heads"], rope_theta=10000.0,
                       max_position_embeddings=32768, bos_token_id=None, **shape)


@dataclass(frozen=True)
class Shape:
    """The matmul-relevant sizes of a decoder-only transformer config (GQA aware)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        return cls(hidden=get("hidden_size"), intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim, vocab=get("vocab_size"))

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear modules -> (in_features, out_features), as nn.Linear stores them."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _gemm(kind: str, shape: tuple[int, int]) -> str:
    """Work is keyed by the matmul's own shape, so equal shapes share one measured rate."""
    return f"{kind}:{shape[0]}x{shape[1]}"


def _add(work: dict[str, float], key: str, flops: float) -> None:
    work[key] = work.get(key, 0.0) + flops


def _check(sequence_lengths, response_lengths) -> tuple[list[int], list[int]]:
    sequence_lengths, response_lengths = list(map(int, sequence_lengths)), list(map(int, response_lengths))
    if len(sequence_lengths) != len(response_lengths):
        raise ValueError("one response length per sequence")
    if any(r > s - 1 or r < 0 for s, r in zip(sequence_lengths, response_lengths)):
        raise ValueError("a response length must be below its sequence length (position 0 is never predicted)")
    return sequence_lengths, response_lengths


def _forward(shape: Shape, tokens: int, pairs: int, head_rows: int, work: dict, family: str = "linear") -> None:
    """One forward's matmuls (or, family "dgrad", their input gradients, the same FLOPs): the body
    over `tokens`, causal attention over `pairs` query-key pairs (sum of L(L+1)/2 per sequence),
    the output head over `head_rows` positions."""
    for n_in, n_out in shape.linears().values():
        _add(work, _gemm(family, (n_in, n_out)), shape.layers * 2 * tokens * n_in * n_out)
    # QK^T and PV: 2 matmuls x 2 FLOPs x head_dim per (query, key) pair, every query head.
    _add(work, "attention", shape.layers * 2 * 2 * shape.heads * shape.head_dim * pairs)
    _add(work, _gemm(family, (shape.hidden, shape.vocab)), 2 * head_rows * shape.hidden * shape.vocab)


def phase_one_flops(config, sequence_lengths: Iterable[int], response_lengths: Iterable[int]) -> dict[str, float]:
    """Useful FLOPs of scoring these sequences with ONE scorer of `config`: the body over every
    token (unpadded), causal attention within each sequence, the output head at response positions.
    Sum the dicts (`add_work`) for several scorers."""
    shape = Shape.of(config)
    sequence_lengths, response_lengths = _check(sequence_lengths, response_lengths)
    work: dict[str, float] = {}
    pairs = sum(n * (n + 1) // 2 for n in sequence_lengths)
    _forward(shape, sum(sequence_lengths), pairs, sum(response_lengths), work)
    return work


def phase_two_flops(config, sequence_lengths: Iterable[int], response_lengths: Iterable[int], *,
                    lora_rank: int = 0, lora_targets: Iterable[str] = BODY_LINEARS,
                    reference_forward: bool = False) -> dict[str, float]:
    """Useful FLOPs of one pass of training over these sequences (the caller passes every sequence
    the loss forwards: chosen only for WSPO, chosen and rejected for DPO).

    Full fine-tuning (lora_rank 0): forward, input gradients, weight gradients of every matmul (3x
    the forward, less the first layer's q/k/v input gradients). LoRA (lora_rank r on
    `lora_targets`): frozen base and head do forward + input gradient only; each adapter (A: in->r,
    B: r->out) forward + input + weight gradients. `reference_forward`: the strong reference's
    forward over the same tokens (a frozen copy, or LoRA with adapters off) when the shards do
    not hold its log-probs.
    """
    shape = Shape.of(config)
    sequence_lengths, response_lengths = _check(sequence_lengths, response_lengths)
    tokens, heads = sum(sequence_lengths), sum(response_lengths)
    pairs = sum(n * (n + 1) // 2 for n in sequence_lengths)
    work: dict[str, float] = {}
    _forward(shape, tokens, pairs, heads, work)  # the policy's forward
    _forward(shape, tokens, pairs, heads, work, family="dgrad")  # its input gradients
    # Attention's backward is 4 matmuls (dP, dV, dQ, dK) to the forward's 2: one more forward's worth.
    _add(work, "attention", shape.layers * 2 * 2 * shape.heads * shape.head_dim * pairs)
    linears = shape.linears()
    # The first layer's q/k/v input gradient feeds only the embeddings (a scatter): not useful matmul work.
    for name in ("q_proj", "k_proj", "v_proj"):
        _add(work, _gemm("dgrad", linears[name]), -2 * tokens * linears[name][0] * linears[name][1])
    if lora_rank:
        targets = set(lora_targets)
        unknown = targets - set(linears)
        if unknown:
            raise ValueError(f"lora_targets {sorted(unknown)} are not body linears of this shape ({', '.join(linears)})")
        for name in targets:
            n_in, n_out = linears[name]
            # A (in -> r) then B (r -> out): forward, input gradient and weight gradient of each.
            for pair in ((n_in, lora_rank), (lora_rank, n_out)):
                for family in ("linear", "dgrad", "wgrad"):
                    _add(work, _gemm(family, pair), shape.layers * 2 * tokens * pair[0] * pair[1])
            if name in ("q_proj", "k_proj", "v_proj"):  # the first layer's A input gradient: unused, as above
                _add(work, _gemm("dgrad", (n_in, lora_rank)), -2 * tokens * n_in * lora_rank)
    else:
        for name, (n_in, n_out) in linears.items():  # weight gradients
            _add(work, _gemm("wgrad", (n_in, n_out)), shape.layers * 2 * tokens * n_in * n_out)
        _add(work, _gemm("wgrad", (shape.hidden, shape.vocab)), 2 * heads * shape.hidden * shape.vocab)
    if reference_forward:
        _forward(shape, tokens, pairs, heads, work)
    return work


def add_work(*works: Mapping[str, float]) -> dict[str, float]:
    """The sum of several work dicts (e.g. two scorers of phase one)."""
    total: dict[str, float] = {}
    for work in works:
        for key, flops in work.items():
            _add(total, key, flops)
    return total


def total_flops(work: Mapping[str, float]) -> float:
    return float(sum(work.values()))


# -- the ceiling ---------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _time_rate(run, flops: float, device: str, min_seconds: float, min_repeats: int) -> tuple[float, float]:
    """(median, best) FLOP/s of `run()`, after one warm-up call."""
    run()
    _sync(device)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times), flops / min(times)


@dataclass
class Ceiling:
    """Matmul rates (FLOP/s) measured at a model's own GEMM shapes, dtype, device and threads."""

    dtype: str
    device: str
    threads: int
    tokens: int
    rates: dict[str, float] = field(default_factory=dict)  # median repeat's rate per GEMM kind
    best_rates: dict[str, float] = field(default_factory=dict)  # fastest repeat's rate: the ceiling

    @classmethod
    def measure(cls, config, dtype, device: str = "cpu", *, kinds: Iterable[str] | None = None,
                tokens: int = 2048, head_rows: int | None = None, attention_length: int = 512,
                threads: int | None = None, min_seconds: float = 0.3, min_repeats: int = 3) -> "Ceiling":
        """Time each GEMM the model runs, as the model runs it (`F.linear` with an [out, in] weight;
        the backward's transposed products for `wgrad:`), in this process.

        kinds: the keys of a work dict (default: every kind of full fine-tuning phase two).
        tokens: rows of the body's matmuls (a forward batch's tokens); head_rows: rows of one
        output-head chunk (default: as `wspo.logprobs` sizes them); attention_length: the sequence
        length of the attention matmul timed ([heads, L, head_dim] x [heads, head_dim, L]).
        threads: torch intra-op threads (default: leave as is; recorded either way).
        """
        import torch
        import torch.nn.functional as F

        if threads is not None:
            torch.set_num_threads(threads)
        shape = Shape.of(config)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if head_rows is None:
            from wspo.logprobs import HEAD_CHUNK_BYTES

            head_rows = max(1, HEAD_CHUNK_BYTES // (4 * shape.vocab))
        if kinds is None:
            kinds = phase_two_flops(config, [2], [1]).keys()
        ceiling = cls(dtype=str(dtype).removeprefix("torch."), device=device, threads=torch.get_num_threads(), tokens=tokens)
        generator = torch.Generator(device="cpu").manual_seed(0)

        def rand(*size):
            return (torch.randn(*size, generator=generator) * 0.05).to(device=device, dtype=dtype)

        with torch.inference_mode():
            for kind in sorted(set(kinds)):
                if kind == "attention":
                    length, hd = attention_length, shape.head_dim
                    q, k, v = rand(shape.heads, length, hd), rand(shape.heads, hd, length), rand(shape.heads, length, hd)
                    run = lambda q=q, k=k, v=v: torch.matmul(torch.matmul(q, k), v)  # noqa: E731
                    flops = 2 * 2 * shape.heads * length * length * hd
                else:
                    family, size = kind.split(":")
                    n_in, n_out = map(int, size.split("x"))
                    rows = head_rows if (n_in, n_out) == (shape.hidden, shape.vocab) else tokens
                    if family == "wgrad":  # dW = dY^T X: [out, rows] x [rows, in]
                        a, b = rand(n_out, rows), rand(rows, n_in)
                        run = lambda a=a, b=b: torch.matmul(a, b)  # noqa: E731
                    elif family == "dgrad":  # dX = dY W: [rows, out] x [out, in]
                        a, b = rand(rows, n_out), rand(n_out, n_in)
                        run = lambda a=a, b=b: torch.matmul(a, b)  # noqa: E731
                    else:  # "linear": y = x W^T, as nn.Linear runs it
                        a, b = rand(rows, n_in), rand(n_out, n_in)
                        run = lambda a=a, b=b: F.linear(a, b)  # noqa: E731
                    flops = 2 * rows * n_in * n_out
                median, best = _time_rate(run, flops, device, min_seconds, min_repeats)
                ceiling.rates[kind], ceiling.best_rates[kind] = median, best
        return ceiling

    @classmethod
    def best_of(cls, *ceilings: "Ceiling") -> "Ceiling":
        """One ceiling from several measurements (e.g. before and after the work): per GEMM kind
        the fastest repeat of any, and the mean of their medians."""
        first = ceilings[0]
        return cls(first.dtype, first.device, first.threads, first.tokens,
                   {k: sum(c.rates[k] for c in ceilings) / len(ceilings) for k in first.rates},
                   {k: max(c.best_rates[k] for c in ceilings) for k in first.best_rates})

    def seconds(self, work: Mapping[str, float], best: bool = True) -> float:
        """The limit: seconds `work` takes with every matmul at its measured rate (best: the fastest
        repeat, the machine's capability; False: the median repeat, what a loaded machine gave)."""
        rates = self.best_rates if best else self.rates
        missing = set(work) - set(rates)
        if missing:
            raise KeyError(f"no rate measured for {sorted(missing)}: pass the work's keys as `kinds` to Ceiling.measure")
        return sum(flops / rates[kind] for kind, flops in work.items() if flops)

    def rate(self, work: Mapping[str, float], best: bool = True) -> float:
        """The FLOP/s of `work` at the ceiling (its FLOPs over its limit seconds)."""
        return total_flops(work) / self.seconds(work, best)

    def fraction(self, work: Mapping[str, float], measured_seconds: float, best: bool = True) -> float:
        """Limit seconds / measured seconds: 1.0 means every matmul ran at the measured rate."""
        return self.seconds(work, best) / measured_seconds

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "device": self.device, "threads": self.threads, "tokens": self.tokens,
                "gflops_per_s": {k: round(v / 1e9, 2) for k, v in sorted(self.rates.items())},
                "best_gflops_per_s": {k: round(v / 1e9, 2) for k, v in sorted(self.best_rates.items())}}


def proc_status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes: VmHWM (peak RSS), VmRSS
    (now), RssAnon / RssFile (heap and mapped files, such as safetensors weights). 0 off Linux."""
    return proc_statuses(key)[key]


def proc_statuses(*keys: str) -> dict[str, int]:
    """Several figures of proc_status from one read of /proc/self/status (one instant), in bytes."""
    found = dict.fromkeys(keys, 0)
    try:
        for line in open("/proc/self/status"):
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0), so a peak read later is that of
    the work in between, not of the set-up before it (a ceiling's matrices). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict:
    """What every figure is recorded with: CPU model, cores, load average (`uptime`), torch build."""
    import os
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    """`python benchmarks/limits.py --preset quick --dtype bfloat16`: a preset's ceiling as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Matmul rates at a model's own GEMM shapes (JSON).")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--lora_rank", type=int, default=0)
    args = parser.parse_args()
    config = config_for(args.preset)
    kinds = phase_two_flops(config, [2], [1], lora_rank=args.lora_rank)
    ceiling = Ceiling.measure(config, args.dtype, args.device, kinds=kinds, tokens=args.tokens, threads=args.threads)
    print(json.dumps({"preset": args.preset, "machine": machine(), "ceiling": ceiling.as_dict()}, indent=2))


if __name__ == "__main__":
    main()
