"""Phase two: shards + strong model -> trained model (DESIGN sections 1 and 6).

    config.py    the keys of wspo-train (besides transformers.TrainingArguments)
    shard_sets.py  shard sets opened, verified and checked against the loss, the strong tokenizer
                 and the reference; what the run record says of them
    examples.py  one shard row -> one checked, re-tokenized example (projected with another tokenizer)
    batches.py   examples -> padded (or packed) batches
    rows.py      wspo / sft rows in memory-mapped Arrow, each example built and checked when drawn
    row_cache.py the Arrow file of a shard set's rows, written once by a helper process
    packing.py   padding-free packed batches (position ids restarting per sequence)
    losses.py    the objectives as pure tensor functions (WSPO, SFT, DPO, WRPO)
    pairs.py     dpo / wrpo: the rows of one example put back together (pairs, triples), logp_ref
    preference.py  the DPO / WRPO part of WSPOTrainer (loss, alpha schedule, TRL-style logs)
    trainer.py   WSPOTrainer: a thin transformers.Trainer subclass (loss, reference, logging)
    pipeline.py  run(): the whole job, from opening shards to wspo_run.json
    cli.py       wspo-train;  export.py: wspo-export (merge a LoRA adapter)

The package is also the API function: `wspo.train(RECIPE.yaml?, **keys) -> TrainResult` (see
wspo.api and docs/api.md).
"""

from wspo.api import make_callable

make_callable(__name__)
