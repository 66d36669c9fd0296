#!/usr/bin/env bash
# Personalisation on the demo's data: at every demo site, the federation's final model
# against the same model fine-tuned on the site's own training split (`fedflow-client
# personalise`, the agent's `[personalisation]` with its defaults), both scored on the
# site's validation split, which neither the federation nor the fine-tuning trained on.
# Usage: bench/personalisation.sh [DEMO_OUT]   (runs the demo there first if needed;
# default runs/demo). Prints one line per site and the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo}
bin=${CARGO_TARGET_DIR:-target}/release
cargo build -q --release -p fedflow-sim -p fedflow-client -p fedflow-coordinator
[ -f "$out/demo.json" ] || "$bin/fedflow-sim" demo --out "$out"
round=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rounds"])' "$out/demo.json")
"$bin/fedflow-coordinator" export --data "$out/coordinator" --round "$round" \
  --out "$out/final-model" --force >/dev/null
mkdir -p "$out/personalise"
for f in "$out"/data/sites/*.csv; do
  "$bin/fedflow-client" personalise --model "$out/final-model" --data "$f" --json \
    > "$out/personalise/$(basename "$f" .csv).json"
done
python3 - "$out/personalise" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    pub, per = r["published"], r["personalised"]
    rows.append((p.stem, r["validation_sessions"], pub and pub["accuracy"], per and per["accuracy"], r["chosen"]))
    print(f"{p.stem}  validation {r['validation_sessions']:>4}  published "
          + (f"{pub['accuracy']:.4f}" if pub else "   -  ")
          + "  personalised " + (f"{per['accuracy']:.4f}" if per else "   -  ")
          + f"  {'served' if r['chosen'] else 'kept published'}"
          + (f"  ({r['reason']})" if r["reason"] and not pub else ""))
tried = [r for r in rows if r[2] is not None]
n = sum(r[1] for r in tried)
if tried:
    pub = sum(r[1] * r[2] for r in tried) / n
    per = sum(r[1] * r[3] for r in tried) / n
    served = sum(r[1] * (r[3] if r[4] else r[2]) for r in tried) / n
    print(f"sites tried {len(tried)} of {len(rows)}; chosen at {sum(r[4] for r in tried)}; "
          f"validation-weighted accuracy: published {pub:.4f}, personalised {per:.4f}, "
          f"what the agents serve {served:.4f}")
PY
