#!/usr/bin/env bash
# Raw ShareGPT dump → cleaned, filtered, deduplicated, identity-augmented, length-split train/test files
# (the chain FastChat's prepare_all.py runs, with chattune's tools). Every step prints kept/dropped with
# reasons and writes a JSON report next to its output.
#
#   scripts/prepare_all.sh RAW.json OUT_DIR [TOKENIZER] [TEMPLATE] [MAX_LENGTH]
#   e.g. scripts/prepare_all.sh sharegpt_html.json data/prepared asset:llama-spm vicuna_v1.1 2048
#
# Environment: LANGS="en" (languages to keep), NAME/ORG (identity answers; set NAME= to skip),
# TEST_RATIO=0.01, PY=python.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
RAW=$1
OUT=$2
TOKENIZER=${3:-asset:llama-spm}
TEMPLATE=${4:-vicuna_v1.1}
MAX_LENGTH=${5:-2048}
LANGS=${LANGS:-en}
NAME=${NAME-Vicuna}
ORG=${ORG:-Large Model Systems Organization (LMSYS)}
TEST_RATIO=${TEST_RATIO:-0.01}
PY=${PY:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"

step() { echo "== $1"; }
step "clean (HTML → markdown, code blocks, roles, empty/short, duplicate ids and content)"
$PY "$HERE/clean_sharegpt.py" --in-file "$RAW" --out-file "$OUT/clean.json" --report "$OUT/clean.report.json"
step "filter (valid structure; language: $LANGS)"
# shellcheck disable=SC2086
$PY "$HERE/filter.py" --in-file "$OUT/clean.json" --out-file "$OUT/filtered.json" --lang $LANGS \
  --report "$OUT/filtered.report.json"
step "dedup (exact and MinHash near-duplicates)"
$PY "$HERE/dedup.py" --in-file "$OUT/filtered.json" --out-file "$OUT/dedup.json" --report "$OUT/dedup.report.json"
MERGE_IN=("$OUT/dedup.json")
if [[ -n "$NAME" ]]; then
  step "identity questions for $NAME ($ORG)"
  $PY "$HERE/hardcoded_identity.py" --name "$NAME" --organization "$ORG" --out-file "$OUT/identity.json"
  MERGE_IN+=("$OUT/identity.json")
fi
step "merge"
$PY "$HERE/merge.py" --in-file "${MERGE_IN[@]}" --out-file "$OUT/merged.json" --report "$OUT/merged.report.json"
step "split long conversations ($MAX_LENGTH tokens, $TEMPLATE, $TOKENIZER)"
$PY "$HERE/split_long_conversation.py" --in-file "$OUT/merged.json" --out-file "$OUT/split.json" \
  --tokenizer "$TOKENIZER" --template "$TEMPLATE" --max-length "$MAX_LENGTH" --report "$OUT/split.report.json"
step "train/test split (ratio $TEST_RATIO; parts of one conversation stay together)"
$PY "$HERE/split_train_test.py" --in-file "$OUT/split.json" --ratio "$TEST_RATIO" \
  --train-file "$OUT/train.json" --test-file "$OUT/test.json"
step "statistics"
$PY "$HERE/stats.py" --in-file "$OUT/train.json" --tokenizer "$TOKENIZER" --template "$TEMPLATE" \
  --max-length "$MAX_LENGTH" --histogram "$OUT/train_lengths.png" --json "$OUT/train.stats.json"
echo "done: train on $OUT/train.json, evaluate on $OUT/test.json (python -m eval.loss --data $OUT/test.json ...)"
