#!/usr/bin/env bash
# EXPERIMENTS.md: KILM vs a fair text-infilling baseline, a small BART from scratch on the dump excerpt
# (whole articles) + WordNet. Same data, markup, steps and seeds; the configs differ only in
# masking.knowledge_slot. Evaluated by mention on held-out articles (the test split). ~55 min on 2 CPU cores.
# EXPERIMENTS.md itself: INTO=EXPERIMENTS.md REPORT_DIR=docs/experiment bash experiments/kilm_vs_infilling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=$(realpath -m "${OUT:-runs/experiment}")
K=.venv/bin/kilm-ray
KB="$SHARED/wordnet-nouns.jsonl.gz"
$K preprocess --config configs/experiment-kilm.yaml --dump "$SHARED/enwiki-sample-pages-articles.xml.bz2" \
  --knowledge "$KB" --out "$OUT/data"
for name in kilm infilling; do
  $K train --config "configs/experiment-$name.yaml" --data "$OUT/data" --run-dir "$OUT" --name "$name"
  $K eval --config "configs/experiment-$name.yaml" --model "$OUT/$name/export" --data "$OUT/data" \
    --report "$OUT/report-$name" --run "$OUT/$name" --knowledge "$KB" --qa experiments/qa-questions.tsv \
    --label "$name"
done
$K compare --metrics "$OUT/report-kilm/metrics.json" "$OUT/report-infilling/metrics.json" \
  --labels KILM "infilling + markup (baseline)" --runs "$OUT/kilm" "$OUT/infilling" --out "${REPORT_DIR:-$OUT/report}" \
  ${INTO:+--into "$INTO"}
cp "$OUT/report-kilm/metrics.json" "${REPORT_DIR:-$OUT/report}/metrics-kilm.json"
cp "$OUT/report-infilling/metrics.json" "${REPORT_DIR:-$OUT/report}/metrics-infilling.json"
echo "report: ${REPORT_DIR:-$OUT/report}/report.md"
