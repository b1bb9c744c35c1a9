#!/usr/bin/env bash
# Settings and helpers shared by scripts/main.sh, scripts/grid.sh and scripts/seeds.sh (sourced,
# never run): the sequence lengths, the training arguments every run uses, and the resumable step.
# shellcheck disable=SC2034  # the arrays are used by the scripts that source this file
O=${WSPO_PIPELINE_DIR:-outputs/pipeline}  # where the main job's outputs go
LENGTHS=(--max_length 512 --max_prompt_length 256)
TRAIN=(--max_length 256 --eval_fraction 0.05 --per_device_train_batch_size 8 --lr_scheduler_type cosine
       --warmup_steps 0.05 --logging_steps 25 --eval_strategy no --save_strategy no --report_to none
       --dataloader_pin_memory false --disable_tqdm true)
# Training lengths of the main job (docs/main-job.md, "What was tried", says why these numbers).
WEAK_SFT_STEPS=150 STRONG_SFT_STEPS=200 DPO_STEPS=20 WSPO_STEPS=30 MAX_NEW_TOKENS=160
if [ "${WSPO_SMOKE:-0}" = 1 ]; then  # a smoke test of the scripts (tests/test_main_job_scripts.py): 2 steps each
  WEAK_SFT_STEPS=2 STRONG_SFT_STEPS=2 DPO_STEPS=2 WSPO_STEPS=2 MAX_NEW_TOKENS=4
fi
PAPER_GAMMA=0.1
GAMMAS=(0.25 1.0)  # the sweep besides the paper's 0.1 (which is strong_wspo)
# Phase two: WSPO of the strong SFT model from the shards alone, a small learning rate.
WSPO=(--loss wspo --model_name_or_path "$O/strong_sft" --shards "$O/shards/wspo" --max_steps "$WSPO_STEPS"
      --learning_rate 3e-5 "${TRAIN[@]}")
EVAL_SPLIT=(--dataset embedded --dataset_split test_prefs)

step() {  # step "what" OUTPUT_FILE command...: run the command unless OUTPUT_FILE exists
  local what=$1 output=$2
  shift 2
  # Progress goes to stderr: a step's stdout may be redirected into its output file.
  if [ -e "$output" ]; then echo "== $what: done already ($output)" >&2; return; fi
  echo "== $what ($(date +%T))" >&2
  # Every step's wall and CPU seconds (children included) to stderr: on a shared machine the CPU
  # seconds tell what the step costs, the wall seconds only how busy the machine was.
  local TIMEFORMAT="   took %R s wall, %U s user + %S s sys CPU: $what"
  time "$@"
}
to_file() {  # to_file FILE command...: the command's stdout into FILE, which appears only when done
  local out=$1
  shift
  mkdir -p "$(dirname "$out")"
  "$@" > "$out.tmp" && mv "$out.tmp" "$out"
}
evaluate() {  # evaluate EVAL_DIR NAME MODEL [REFERENCE]: held-out rewards (if REFERENCE) and greedy answers
  local dir=$1 name=$2 model=$3 reference=${4:-}
  if [ -n "$reference" ]; then
    step "held-out implicit rewards and NLL: $name" "$dir/rewards-$name.json" \
      to_file "$dir/rewards-$name.json" wspo-eval rewards --policy "$model" --reference "$reference" \
        "${EVAL_SPLIT[@]}" "${LENGTHS[@]}"
  fi
  step "held-out greedy answers: $name" "$dir/generate-$name.json" \
    to_file "$dir/generate-$name.json" wspo-eval generate --model "$model" "${EVAL_SPLIT[@]}" \
      --max_new_tokens "$MAX_NEW_TOKENS" --output_file "$dir/answers-$name.json"
}
