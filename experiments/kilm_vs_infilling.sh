#!/usr/bin/env bash
# EXPERIMENTS.md: KILM against two baselines, small BARTs from scratch on the dump excerpt (whole articles)
# + WordNet, with the same data, chunks, entity draws, steps and seeds:
#   kilm       configs/experiment-kilm.yaml       the knowledge slot <ent_desc>Title<sep>description</ent_desc>
#   infilling  configs/experiment-infilling.yaml  markup only (<ent>mention</ent>), no knowledge: the objective's baseline
#   text       configs/experiment-text.yaml       the same knowledge as plain text after the mention, BART's own
#                                                 objective: the data-matched baseline
# Configs are chosen on the valid split; the test split is looked at once per reported model, each look counted
# in the dataset's test ledger (runs/experiment/data/test_looks.jsonl: a fourth look is refused). ~55 min on 2 cores.
#
#   bash experiments/kilm_vs_infilling.sh                 # everything, in order
#   bash experiments/kilm_vs_infilling.sh train-kilm      # one step (preprocess, train-NAME, valid-NAME,
#                                                         # test-NAME, compare), e.g. one per locked command
#   bash experiments/kilm_vs_infilling.sh same-lr         # after the rest: KILM at the data-matched
#                                                         # baseline's lr, valid figures only (~18 min)
# EXPERIMENTS.md itself: INTO=EXPERIMENTS.md REPORT_DIR=docs/experiment bash experiments/kilm_vs_infilling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=$(realpath -m "${OUT:-runs/experiment}")
REPORT_DIR=${REPORT_DIR:-$OUT/report}
K=.venv/bin/kilm-ray
KB="$SHARED/wordnet-nouns.jsonl.gz"
MODELS=(kilm infilling text)
LABELS=("KILM" "infilling + markup (baseline)" "knowledge as text (data-matched baseline)")

evaluate() {  # evaluate NAME SPLIT [CONFIG-NAME [key=value overrides the training had]]
  $K eval --config "configs/experiment-${3:-$1}.yaml" --model "$OUT/$1/export" --data "$OUT/data" --split "$2" \
    --report "$OUT/report-$1-$2" --run "$OUT/$1" --knowledge "$KB" --qa experiments/qa-questions.tsv --label "$1" \
    "${@:4}"
}

run_step() {
  case "$1" in
    preprocess)
      $K preprocess --config configs/experiment-kilm.yaml --dump "$SHARED/enwiki-sample-pages-articles.xml.bz2" \
        --knowledge "$KB" --out "$OUT/data" ;;
    train-*)
      name=${1#train-}
      $K train --config "configs/experiment-$name.yaml" --data "$OUT/data" --run-dir "$OUT" --name "$name" ;;
    valid-*) evaluate "${1#valid-}" valid ;;
    same-lr)  # a check, not a reported model: KILM at the data-matched baseline's lr, on valid only
      lr=$(grep -E '^\s+lr:' configs/experiment-text.yaml | awk '{print $2}')
      $K train --config configs/experiment-kilm.yaml --data "$OUT/data" --run-dir "$OUT" --name kilm-same-lr \
        "train.lr=$lr"
      evaluate kilm-same-lr valid kilm "train.lr=$lr"
      $K compare --labels "KILM lr $lr" "KILM" "knowledge as text lr $lr" --out "$OUT/report-same-lr" \
        --metrics "$OUT/report-kilm-same-lr-valid/metrics.json" "$OUT/report-kilm-valid/metrics.json" \
        "$OUT/report-text-valid/metrics.json"
      echo "report: $OUT/report-same-lr/report.md" ;;
    test-*)  # one look per model, in the order of MODELS: the dataset's test ledger refuses any other
      name=${1#test-}
      before=0
      for m in "${MODELS[@]}"; do [ "$m" = "$name" ] && break; before=$((before + 1)); done
      evaluate "$name" test "$name" "eval.test_looks_before=$before" ;;
    compare)
      mkdir -p "$REPORT_DIR"
      $K compare --labels "${LABELS[@]}" \
        --metrics $(for m in "${MODELS[@]}"; do echo "$OUT/report-$m-test/metrics.json"; done) \
        --selection $(for m in "${MODELS[@]}"; do echo "$OUT/report-$m-valid/metrics.json"; done) \
        --runs $(for m in "${MODELS[@]}"; do echo "$OUT/$m"; done) --out "$REPORT_DIR" ${INTO:+--into "$INTO"}
      for m in "${MODELS[@]}"; do
        cp "$OUT/report-$m-test/metrics.json" "$REPORT_DIR/metrics-$m.json"
        cp "$OUT/report-$m-valid/metrics.json" "$REPORT_DIR/metrics-$m-valid.json"
      done
      echo "report: $REPORT_DIR/report.md" ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}

if [ $# -eq 0 ]; then
  set -- preprocess $(for m in "${MODELS[@]}"; do echo "train-$m"; done) \
    $(for m in "${MODELS[@]}"; do echo "valid-$m"; done) $(for m in "${MODELS[@]}"; do echo "test-$m"; done) compare
fi
for s in "$@"; do run_step "$s"; done
