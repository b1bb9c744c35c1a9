#!/usr/bin/env bash
# Why does WSPO's effect shrink when the strong SFT model gets better? A grid over the SAME phase-one
# shards of a main job run: strong SFT steps x WSPO (learning rate, steps) x gamma. Every cell is
# trained from the shards alone and evaluated on the held-out pairs like the main job; the table
# (grid.json, grid.md) is written by `python -m wspo.embedded.grid`. docs/main-job.md reads it.
#
#   bash scripts/main.sh                  # first: the weak side and the WSPO shards (outputs/pipeline)
#   bash scripts/grid.sh                  # then the grid, under outputs/grid
#
# Knobs (environment): WSPO_PIPELINE_DIR (the main job's folder, default outputs/pipeline),
# WSPO_GRID_DIR (default outputs/grid), GRID_SFT_STEPS, GRID_WSPO (learning_rate:steps pairs),
# GRID_GAMMAS. A cell whose output exists is skipped, so the grid can be extended or resumed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/env.sh
# shellcheck disable=SC1091
. scripts/pipeline-lib.sh  # O (the main job's folder), TRAIN, step, evaluate
export TOKENIZERS_PARALLELISM=false

G=${WSPO_GRID_DIR:-outputs/grid}
read -r -a SFT_STEPS <<< "${GRID_SFT_STEPS:-100 200}"
read -r -a WSPO_SETTINGS <<< "${GRID_WSPO:-1e-4:30 3e-5:30 1e-5:30}"
read -r -a GAMMAS <<< "${GRID_GAMMAS:-0.1}"
STRONG_SFT_LR=${GRID_STRONG_SFT_LR:-2e-3}

for needed in "$O/models/strong_base/config.json" "$O/shards/sft/manifest.json" "$O/shards/wspo/manifest.json"; do
  if [ ! -e "$needed" ]; then
    echo "scripts/grid.sh: $needed is missing: run bash scripts/main.sh first (WSPO_PIPELINE_DIR=$O)" >&2
    exit 2
  fi
done

for sft_steps in "${SFT_STEPS[@]}"; do
  S="$G/sft-$sft_steps"
  step "grid: strong SFT, $sft_steps steps" "$S/strong_sft/wspo_run.json" \
    wspo-train --loss sft --model_name_or_path "$O/models/strong_base" --shards "$O/shards/sft" \
      --output_dir "$S/strong_sft" --max_steps "$sft_steps" --learning_rate "$STRONG_SFT_LR" "${TRAIN[@]}" --seed 0
  evaluate "$S/eval" strong_sft "$S/strong_sft"
  for setting in "${WSPO_SETTINGS[@]}"; do
    lr=${setting%%:*} steps=${setting##*:}
    for g in "${GAMMAS[@]}"; do
      name="wspo_lr${lr}_steps${steps}_gamma${g}"
      step "grid: strong SFT $sft_steps, $name" "$S/$name/wspo_run.json" \
        wspo-train --loss wspo --model_name_or_path "$S/strong_sft" --shards "$O/shards/wspo" --gamma "$g" \
          --max_steps "$steps" --learning_rate "$lr" --output_dir "$S/$name" "${TRAIN[@]}" --seed 0
      evaluate "$S/eval" "$name" "$S/$name" "$S/strong_sft"
    done
  done
done

python -m wspo.embedded.grid "$G" --pipeline_dir "$O"
