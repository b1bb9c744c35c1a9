#!/usr/bin/env bash
# How much do the main job's numbers move with the seed? Reruns phase two (WSPO of the strong SFT
# model from the SAME shards, every gamma of the main job) and its held-out evaluation with other
# training seeds, then writes the report with the mean and spread over the runs (the main job's own
# run, seed 0, counts as the first). The weak models, the strong SFT model and the shards are not
# retrained: they are what the seeds share.
#
#   bash scripts/main.sh && bash scripts/seeds.sh
#
# Knobs (environment): WSPO_PIPELINE_DIR (default outputs/pipeline), WSPO_SEEDS (default "1 2"),
# WSPO_SEED_GAMMAS (default: the main job's gammas). The reruns go to $WSPO_PIPELINE_DIR/seeds/
# seed-<s>/; report.json and report.png are rewritten with `seeds` (mean, std) per model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/env.sh
# shellcheck disable=SC1091
. scripts/pipeline-lib.sh
export TOKENIZERS_PARALLELISM=false

O=${WSPO_PIPELINE_DIR:-outputs/pipeline}
read -r -a SEEDS <<< "${WSPO_SEEDS:-1 2}"
read -r -a SEED_GAMMAS <<< "${WSPO_SEED_GAMMAS:-$PAPER_GAMMA ${GAMMAS[*]}}"

for needed in "$O/strong_sft/wspo_run.json" "$O/shards/wspo/manifest.json" "$O/eval"; do
  if [ ! -e "$needed" ]; then
    echo "scripts/seeds.sh: $needed is missing: run bash scripts/main.sh first (WSPO_PIPELINE_DIR=$O)" >&2
    exit 2
  fi
done

seed_dirs=()
for seed in "${SEEDS[@]}"; do
  D="$O/seeds/seed-$seed"
  for g in "${SEED_GAMMAS[@]}"; do
    name=$( [ "$g" = "$PAPER_GAMMA" ] && echo strong_wspo || echo "strong_wspo_gamma_$g" )
    step "seed $seed: WSPO strong SFT from the shards (gamma $g)" "$D/$name/wspo_run.json" \
      wspo-train --gamma "$g" --output_dir "$D/$name" "${WSPO[@]}" --seed "$seed"
    evaluate "$D/eval" "$name" "$D/$name" "$O/strong_sft"
  done
  seed_dirs+=("$D/eval")
done

echo
python -m wspo.embedded.report "$O/eval" --seeds "${seed_dirs[@]}"
