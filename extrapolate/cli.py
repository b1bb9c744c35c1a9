"""`wspo-extrapolate --sft A --aligned B --alpha 0.3 [0.5 ...] --output_dir OUT`: ExPO (see README)."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

from wspo.args import parse_config
from wspo.disk import error_text
from wspo.errors import WspoError
from wspo.paths import check_output

from .expo import OUT_DTYPES, extrapolate
from .tensors import parse_size


@dataclass
class ExtrapolateArguments:
    sft: str = field(metadata={"help": "The model before alignment: a directory with safetensors weights."})
    aligned: str = field(metadata={"help": "The model after alignment (same architecture), or a PEFT LoRA "
                                           "adapter directory trained on --sft."})
    # "extend": `--alpha 0.3 0.5` and `--alpha 0.3 --alpha 0.5` both give [0.3, 0.5].
    alpha: list[float] = field(metadata={"help": "Extrapolation strength(s); one output directory each.",
                                         "action": "extend"})
    output_dir: str = field(metadata={"help": "Writes OUTPUT_DIR/alpha-<alpha>/ for every alpha."})
    out_dtype: str = field(default="auto", metadata={
        "help": "Dtype of the written weights; auto keeps the input's.", "choices": list(OUT_DTYPES)})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest output shard, e.g. 2GB, 500MB."})
    swallow_threshold: float = field(default=0.5, metadata={
        "help": "Warn when, in some tensor, more than this fraction of the elements the step changes round "
                "back to the aligned value in a 16-bit output dtype."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing OUTPUT_DIR/alpha-* directories."})
    allow_base_mismatch: bool = field(default=False, metadata={
        "help": "Apply a LoRA adapter given as --aligned even though its base_model_name_or_path is not --sft."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Turn the progress bar (on stderr) off."})


def run(args: ExtrapolateArguments):
    """Check the output path, then extrapolate (wspo-extrapolate and wspo.extrapolate)."""
    check_output(args.output_dir, {"sft": args.sft, "aligned": args.aligned})
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the swallowed-step warning must reach the user every time
        return extrapolate(args.sft, args.aligned, args.alpha, args.output_dir, out_dtype=args.out_dtype,
                           max_shard_size=parse_size(args.max_shard_size),
                           swallow_threshold=args.swallow_threshold, overwrite=args.overwrite,
                           allow_base_mismatch=args.allow_base_mismatch, progress=not args.disable_tqdm)


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_config([ExtrapolateArguments], argv, prog="wspo-extrapolate", description=(
        "ExPO model extrapolation: theta = theta_aligned + alpha * (theta_aligned - theta_sft), tensor by tensor."))
    try:
        summary = run(args)
    except Exception as e:  # noqa: BLE001 - user-facing errors (WspoError) and disk faults are named; the rest is re-raised
        then = "rerun the same command: no incomplete alpha folder was left (each is published whole)"
        print(f"wspo-extrapolate: error: {error_text(e, (WspoError,), args.output_dir, then)}", file=sys.stderr)
        return 1
    gib = 2**30
    print(f"alphas: {', '.join(str(a) for a in summary.alphas)}")
    for d in summary.output_dirs:
        print(f"  wrote {d}")
    print(f"tensors: {summary.tensors} per model; bytes written: {summary.bytes_written / gib:.3f} GiB "
          f"({summary.bytes_written} bytes, all alphas)")
    print(f"peak RSS: {summary.peak_rss_bytes / gib:.3f} GiB; time: {summary.seconds:.1f} s")
    for alpha, hits in summary.swallowed.items():
        if hits:
            print(f"warning: alpha={alpha}: rounding swallows the step in {len(hits)} tensor(s); "
                  f"see the warning above, or use --out_dtype float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
