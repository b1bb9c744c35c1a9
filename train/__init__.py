"""Phase two: shards + strong model -> trained model (DESIGN sections 1 and 6).

    config.py    the keys of wspo-train (besides transformers.TrainingArguments)
    data.py      shard rows -> checked, re-tokenized examples -> padded batches
    losses.py    the objectives as pure tensor functions (WSPO, SFT, DPO, WRPO)
    pairs.py     dpo / wrpo: the rows of one example put back together (pairs, triples), logp_ref
    preference.py  the DPO / WRPO part of WSPOTrainer (loss, alpha schedule, TRL-style logs)
    trainer.py   WSPOTrainer: a thin transformers.Trainer subclass (loss, reference, logging)
    pipeline.py  run(): the whole job, from opening shards to wspo_run.json
    cli.py       wspo-train;  export.py: wspo-export (merge a LoRA adapter)
"""
