#!/usr/bin/env bash
# EXPERIMENTS.md: KILM vs BART text infilling, a small BART from scratch on the dump excerpt + WordNet.
# Same data, steps, seeds; the two configs differ only in masking.knowledge_prob. ~30 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-runs/experiment}
K=.venv/bin/kilm-ray
$K preprocess --config configs/experiment-kilm.yaml --dump "$SHARED/enwiki-sample-pages-articles.xml.bz2" \
  --knowledge "$SHARED/wordnet-nouns.jsonl.gz" --out "$OUT/data"
for name in kilm infilling; do
  $K train --config "configs/experiment-$name.yaml" --data "$OUT/data" --run-dir "$OUT" --name "$name"
  $K eval --config "configs/experiment-$name.yaml" --model "$OUT/$name/export" --data "$OUT/data" \
    --report "$OUT/report-$name" --run "$OUT/$name" --knowledge "$SHARED/wordnet-nouns.jsonl.gz" --label "$name"
done
$K compare --metrics "$OUT/report-kilm/metrics.json" "$OUT/report-infilling/metrics.json" \
  --labels KILM "text infilling only" --runs "$OUT/kilm" "$OUT/infilling" --out "$OUT/report"
echo "report: $OUT/report/report.md"
