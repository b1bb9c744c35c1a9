"""`wspo-eval`: implicit-reward accuracy and margins of a (policy, reference) pair, and completions
for a prompt set in AlpacaEval's JSON layout (see README, "Evaluation")."""
