#!/usr/bin/env bash
# Issue 5's "done when", up to the DPO step: a review project from 20 held-out meetup chats x 2
# models (the embedded base vs a quickstart run), reviewed in the browser (headless Chromium,
# stand-in reviewers: scripts/review_demo_browser.py), preferences exported, report written.
#
#   bash scripts/review_demo.sh [QUICKSTART_RUN] [OUT]     (defaults: newest runs/quickstart-*, review-demo/)
#
# Without a finished quickstart run it runs `tunelab quickstart` first (~8 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=${1:-$(ls -d runs/quickstart-*/ 2>/dev/null | while read -r d; do [ -e "$d/adapter" ] && echo "${d%/}"; done | sort | tail -1)}
if [ -z "$RUN" ]; then
    $BIN/tunelab quickstart
    RUN=$(ls -d runs/quickstart-*/ | sort | tail -1); RUN=${RUN%/}
fi
OUT=${2:-review-demo}
DB="$OUT/review.db"
rm -rf "$OUT" && mkdir -p "$OUT"

# 20 chats the quickstart never trained on (another seed), without their answers; the answer
# becomes the reference shown to reviewers.
$BIN/python - "$OUT/prompts.jsonl" <<'PY'
import json, sys
from tunelab.data.synthetic import make_meetup_task
rows = make_meetup_task(20, seed=2026)
with open(sys.argv[1], "w") as f:
    for i, r in enumerate(rows):
        f.write(json.dumps({"id": f"chat-{i:02d}", "messages": r["messages"][:-1], "reference": r["messages"][-1]["content"]}) + "\n")
PY

$BIN/tunelab review init --db "$DB" --per-item 2
ALICE=$($BIN/tunelab review add-reviewer alice --admin --db "$DB" | tail -1)
BOB=$($BIN/tunelab review add-reviewer bob --db "$DB" | tail -1)
$BIN/tunelab review add-task "$OUT/prompts.jsonl" --model embedded --model "$RUN" --kind both --max-new-tokens 48 --db "$DB"

PORT=$($BIN/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$BIN/tunelab review serve --db "$DB" --port "$PORT" &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 50); do $BIN/python -c "import httpx; httpx.get('http://127.0.0.1:$PORT/login')" 2>/dev/null && break; sleep 0.2; done
$BIN/python scripts/review_demo_browser.py "http://127.0.0.1:$PORT" "$ALICE" "$BOB"

$BIN/tunelab review export --db "$DB" --to "$OUT/preferences.jsonl"
$BIN/tunelab review report --db "$DB" --output "$OUT/report"
echo
echo "next, DPO on the exported pairs (issue 5's other half):"
echo "  tunelab dpo recipes/dpo.yaml model.name=$RUN data.format=preferences data.source=$OUT/preferences.jsonl"
