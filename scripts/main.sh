#!/usr/bin/env bash
# The main job: the paper's recipe in miniature, every step through the toolkit's own commands, on
# the embedded default (no model hub, no GPU). Outputs under outputs/pipeline/; a step whose output
# exists is skipped, so a rerun picks up where an interrupted one stopped (rm -rf the folder to
# start over). docs/main-job.md explains every step, the table and the picture.
#   1. tiny weak and strong bases (shared tokenizer); SFT both on the NEUTRAL split of the bundled
#      sample (each train prompt answered by its chosen or its rejected response, a fair coin), so
#      the SFT models show the preference signal about half the time
#   2. reference log-probs of the weak SFT model; a mild DPO of it into the weak aligned model
#   3. WSPO reward shards from the weak SFT / weak DPO pair (scored once)
#   4. WSPO-train the strong SFT model from the shards alone, gamma 0.1 (the paper's) and a sweep
#      of gamma over the SAME shards; ExPO the weak DPO model
#   5. held-out evaluation of every model; report.json, report.png and the table
# scripts/seeds.sh reruns step 4 and 5 with other seeds; scripts/grid.sh varies the strong side.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/env.sh
# shellcheck disable=SC1091
. scripts/pipeline-lib.sh  # O (the output folder), the training lengths, TRAIN, WSPO, GAMMAS, step, evaluate
export TOKENIZERS_PARALLELISM=false

# The neutral split (sft.jsonl) is in the layout of H4 ultrachat_200k: prompt, prompt_id, messages.
NEUTRAL=(--dataset embedded --dataset_split sft --dataset_format columns
         --column_map prompt=prompt,chosen=messages,id=prompt_id --slots chosen)

step "1. tiny bases" "$O/models/strong_base/config.json" \
  python -m wspo.embedded.models "$O/models" --bases
# SFT data: the neutral split tokenized by the rule (scored under the base, which SFT ignores).
step "1. SFT data (neutral split)" "$O/shards/sft/manifest.json" \
  wspo-precompute "${NEUTRAL[@]}" --ref_model "$O/models/weak_base" --output_dir "$O/shards/sft" "${LENGTHS[@]}"
step "1. SFT weak" "$O/weak_sft/wspo_run.json" \
  wspo-train --loss sft --model_name_or_path "$O/models/weak_base" --shards "$O/shards/sft" \
    --output_dir "$O/weak_sft" --max_steps "$WEAK_SFT_STEPS" --learning_rate 3e-3 "${TRAIN[@]}" --seed 0
step "1. SFT strong" "$O/strong_sft/wspo_run.json" \
  wspo-train --loss sft --model_name_or_path "$O/models/strong_base" --shards "$O/shards/sft" \
    --output_dir "$O/strong_sft" --max_steps "$STRONG_SFT_STEPS" --learning_rate 2e-3 "${TRAIN[@]}" --seed 0

step "2. reference log-probs of weak SFT" "$O/shards/ref_weak_sft/manifest.json" \
  wspo-precompute --dataset embedded --slots chosen,rejected --ref_model "$O/weak_sft" \
    --output_dir "$O/shards/ref_weak_sft" "${LENGTHS[@]}"
# A mild DPO: it should leave the weak model fluent (held-out NLL close to weak SFT's).
step "2. DPO weak SFT -> weak aligned" "$O/weak_dpo/wspo_run.json" \
  wspo-train --loss dpo --beta 0.1 --model_name_or_path "$O/weak_sft" --shards "$O/shards/ref_weak_sft" \
    --output_dir "$O/weak_dpo" --max_steps "$DPO_STEPS" --learning_rate 5e-5 "${TRAIN[@]}" --seed 0

step "3. WSPO reward shards (weak SFT / weak DPO)" "$O/shards/wspo/manifest.json" \
  wspo-precompute --dataset embedded --slots chosen --weak_ref "$O/weak_sft" --weak_aligned "$O/weak_dpo" \
    --output_dir "$O/shards/wspo" "${LENGTHS[@]}"

# gamma 0.1 is the paper's: the strong log-ratio is driven to 10x the weak one; a small learning rate.
step "4. WSPO strong SFT from the shards (gamma $PAPER_GAMMA)" "$O/strong_wspo/wspo_run.json" \
  wspo-train --gamma "$PAPER_GAMMA" --output_dir "$O/strong_wspo" "${WSPO[@]}" --seed 0
for g in "${GAMMAS[@]}"; do  # the same shards, reused: phase one is not run again
  step "4. WSPO sweep (gamma $g)" "$O/strong_wspo_gamma_$g/wspo_run.json" \
    wspo-train --gamma "$g" --output_dir "$O/strong_wspo_gamma_$g" "${WSPO[@]}" --seed 0
done
step "4. ExPO weak DPO (alpha 0.3)" "$O/weak_expo/alpha-0.3/config.json" \
  wspo-extrapolate --sft "$O/weak_sft" --aligned "$O/weak_dpo" --alpha 0.3 --output_dir "$O/weak_expo"

# 5. Each model's greedy answers; each aligned model's rewards against its SFT model (the SFT
# models' held-out NLL is the reference side of these files: report.py reads it there).
evaluate "$O/eval" weak_sft "$O/weak_sft"
evaluate "$O/eval" weak_dpo "$O/weak_dpo" "$O/weak_sft"
evaluate "$O/eval" weak_expo "$O/weak_expo/alpha-0.3" "$O/weak_sft"
evaluate "$O/eval" strong_sft "$O/strong_sft"
evaluate "$O/eval" strong_wspo "$O/strong_wspo" "$O/strong_sft"
for g in "${GAMMAS[@]}"; do
  evaluate "$O/eval" "strong_wspo_gamma_$g" "$O/strong_wspo_gamma_$g" "$O/strong_sft"
done

echo
python -m wspo.embedded.report "$O/eval"
