#!/usr/bin/env bash
# Issue 18's closing run: every way tunelab learns from the review demo's reviews, once each.
#
#   bash scripts/feedback_demo.sh [QUICKSTART_RUN] [DEMO]     (defaults: newest runs/quickstart-*, review-demo/)
#
# Without a review project in DEMO it runs scripts/review_demo.sh first (which runs `tunelab quickstart` when
# there is no quickstart run: ~8 min on 2 idle cores). Then, on the embedded SmolLM2-135M + the quickstart's
# LoRA adapter, small step counts sized for a CPU (tens of minutes in all on 2 cores):
#   export: pairs, rankings (every reviewer's order) and ratings (rubric scores >= 36/100, the median, are desirable);
#   reward: pairwise (Bradley-Terry, trl) and listwise (Plackett-Luce over each reviewer's ranking);
#   dpo: dpo, orpo, simpo;  kto on the ratings;  rl: grpo with the listwise reward model + ROUGE-L;
#   report: the listwise reward model against the held-out human rankings (bootstrap intervals);
#   add-task --select uncertain: the two reward models as a committee pick 5 of the demo's prompts to review again.
# Prints one table of before/after numbers and peak memory; everything is under DEMO/feedback/.
# EXTRA="key=value ..." is appended to every training command (e.g. EXTRA="train.max_steps=4" on a busy machine).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
read -r -a EXTRA <<< "${EXTRA:-}"
newest_run() { { ls -d runs/quickstart-*/ 2>/dev/null || true; } | while read -r d; do [ -e "$d/adapter" ] && echo "${d%/}"; done | sort | tail -1; }
RUN=${1:-$(newest_run)}
DEMO=${2:-review-demo}
if [ -z "$RUN" ]; then
    $BIN/tunelab quickstart "${EXTRA[@]}"
    RUN=$(newest_run)
fi
[ -e "$DEMO/review.db" ] || bash scripts/review_demo.sh "$RUN" "$DEMO"
DB="$DEMO/review.db"
OUT="$DEMO/feedback"
rm -rf "$OUT" && mkdir -p "$OUT"

$BIN/tunelab review export --db "$DB" --as pairs --to "$OUT/pairs.jsonl"
$BIN/tunelab review export --db "$DB" --as rankings --to "$OUT/rankings.jsonl"
# The demo's answers score 36/100 (median weighted rubric score) from the stand-in reviewers: a threshold at the
# median gives KTO both kinds (the default, 60, leaves 3 of 40 desirable).
$BIN/tunelab review export --db "$DB" --as ratings --threshold 36 --to "$OUT/ratings.jsonl"

COMMON=(model.name="$RUN" data.max_length=384 data.validation_fraction=0.25 data.max_train_samples=null
        data.max_eval_samples=null train.eval_every=null train.batch_size=4 train.warmup_ratio=0
        eval.generation_samples=4 eval.max_new_tokens=48 eval.batch_size=4)
# The reward models start from the base: building a classifier on the quickstart's LoRA run fails in
# models/build.py today (peft loads a causal-LM adapter into a PeftModelForCausalLM, which a sequence classifier
# cannot be; reported with issue 18).
$BIN/tunelab reward recipes/reward.yaml "${COMMON[@]}" model.name=embedded run.dir="$OUT/reward-pairwise" \
    data.format=preferences data.source="$OUT/pairs.jsonl" train.max_steps=12 train.lr=1e-4 "${EXTRA[@]}"
$BIN/tunelab reward recipes/reward.yaml "${COMMON[@]}" model.name=embedded run.dir="$OUT/reward-listwise" \
    data.format=rankings data.source="$OUT/rankings.jsonl" preference.loss=listwise \
    preference.weight_by_agreement=true train.max_steps=12 train.lr=1e-4 "${EXTRA[@]}"
for METHOD in dpo orpo simpo; do
    BETA=$([ "$METHOD" = simpo ] && echo 2.0 || echo 0.1)
    $BIN/tunelab dpo recipes/dpo.yaml "${COMMON[@]}" run.dir="$OUT/dpo-$METHOD" data.format=preferences \
        data.source="$OUT/pairs.jsonl" preference.method=$METHOD preference.beta=$BETA train.max_steps=8 train.lr=5e-5 "${EXTRA[@]}"
done
$BIN/tunelab kto recipes/kto.yaml "${COMMON[@]}" run.dir="$OUT/kto" data.format=ratings \
    data.source="$OUT/ratings.jsonl" train.max_steps=8 train.lr=5e-5 "${EXTRA[@]}"
$BIN/tunelab rl recipes/rl.yaml "${COMMON[@]}" run.dir="$OUT/rl-grpo" data.format=preferences \
    data.source="$OUT/pairs.jsonl" preference.reward_model=null preference.algorithm=grpo \
    "preference.rewards=[{reward_model: $OUT/reward-listwise, weight: 1.0}, {function: rouge, weight: 1.0}]" \
    preference.num_generations=4 preference.max_new_tokens=32 train.max_steps=6 train.lr=5e-5 "${EXTRA[@]}"

$BIN/tunelab review report --db "$DB" --output "$OUT/report" --reward-model "$OUT/reward-listwise"
cp "$DB" "$OUT/select.db"  # a copy: the demo's own project stays as the reviewers left it
$BIN/python - "$DEMO/prompts.jsonl" "$OUT/again.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]  # the demo's prompts, under new ids: candidates again
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(json.dumps({**r, "id": "again-" + r["id"]}) + "\n")
PY
$BIN/tunelab review add-task "$OUT/again.jsonl" --db "$OUT/select.db" --model embedded --model "$RUN" \
    --max-new-tokens 48 --select uncertain --budget 5 \
    --reward-model "$OUT/reward-pairwise" --reward-model "$OUT/reward-listwise"

$BIN/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = {"reward-pairwise": ["accuracy", "margin"], "reward-listwise": ["accuracy", "kendall_tau"],
        "dpo-dpo": ["reward_accuracy", "logp_accuracy", "logp_margin", "rouge_l"],
        "dpo-orpo": ["logp_accuracy", "logp_margin", "loss", "rouge_l"], "dpo-simpo": ["logp_accuracy", "logp_margin", "loss", "rouge_l"],
        "kto": ["reward_auc", "reward_gap", "logp_auc", "rouge_l"], "rl-grpo": ["reward", "reward/reward-listwise", "reward/rouge", "rouge_l"]}
print(f"\n{'run':16} {'metric':24} {'before':>8} {'after':>8}   peak GiB  train s")
for run, names in keys.items():
    s = json.loads((out / run / "summary.json").read_text())
    for i, name in enumerate(names):
        b, a = s["eval"]["before"].get(name), s["eval"]["after"].get(name)
        tail = f"   {s['train']['peak_memory_gb']:8.2f} {s['train']['runtime_s']:8.0f}" if i == 0 else ""
        fmt = lambda v: f"{v:8.4f}" if isinstance(v, (int, float)) else f"{'n/a':>8}"
        print(f"{run if i == 0 else '':16} {name:24} {fmt(b)} {fmt(a)}{tail}")
rm = json.loads((out / "report" / "summary.json").read_text())["reward_model"]
print(f"\nlistwise reward model vs held-out human rankings ({rm['items']} items, {rm['pairs']} pairs): "
      f"accuracy {rm['accuracy']} 95% CI {rm['accuracy_ci95']}, Kendall tau {rm['kendall_tau']} CI {rm['kendall_tau_ci95']}")
PY
