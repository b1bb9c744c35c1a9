"""`wspo-export --adapter DIR --output_dir OUT`: merge a LoRA adapter into a full model.

The result is an ordinary transformers model directory (safetensors weights, config, tokenizer)
that `from_pretrained` and vLLM load without PEFT.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from wspo.args import SuggestingParser
from wspo.disk import error_text
from wspo.errors import InputPathError, WspoError

from .checkpoints import move_into

EXPORT_TMP = ".export-partial"


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base_model: str | None = None, dtype: str = "auto") -> Path:
    """Load base + adapter, fold the adapter into the base weights, save model and tokenizer."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from wspo.models import check_weights, load_tokenizer, resolve_model_dir
    from wspo.paths import check_output

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise InputPathError(f"--adapter {adapter_dir}: no adapter_config.json, not a LoRA adapter directory")
    base = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base_dir = resolve_model_dir(base, option="base model (adapter_config.json base_model_name_or_path, or --base_model)")
    check_output(output_dir, {"adapter": adapter_dir, "base_model": base_dir})
    check_weights(adapter_dir, option="--adapter")
    check_weights(base_dir, option="--base_model")
    if dtype == "auto":  # the dtype the base model was saved in
        config = json.loads((base_dir / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # Saved into a hidden folder and moved into place when whole (weights last): a full disk or a
    # kill never leaves a complete-looking model in output_dir.
    output_dir = Path(output_dir)
    partial = output_dir / EXPORT_TMP
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(str(partial), safe_serialization=True)
        # The adapter directory holds the tokenizer the run trained with; fall back to the base's.
        tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_dir
        load_tokenizer(tokenizer_dir).save_pretrained(str(partial))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    move_into(partial, output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = SuggestingParser(prog="wspo-export", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="LoRA adapter directory written by wspo-train (or one of its checkpoints).")
    parser.add_argument("--output_dir", required=True, help="Where to write the merged model.")
    parser.add_argument("--base_model", default=None, help="Base model (default: the adapter's base_model_name_or_path).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the merged weights (default: the base model's).")
    args = parser.parse_args(argv)
    try:
        out = merge_adapter(args.adapter, args.output_dir, args.base_model, args.dtype)
    except Exception as e:  # noqa: BLE001 - user-facing errors (WspoError) and disk faults are named; the rest is re-raised
        then = "rerun the same command: nothing incomplete was left in output_dir"
        print(f"wspo-export: error: {error_text(e, (WspoError,), args.output_dir, then)}", file=sys.stderr)
        return 1
    print(f"merged {args.adapter} into a full model at {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
