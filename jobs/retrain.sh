#!/usr/bin/env bash
# Re-train the garment model and publish it only if its validation accuracy is at least the current one's.
#
#   MODEL_DIR   where the published model lives (model.safetensors + model.json)  (required)
#   RUNS_DIR    where training runs are kept                     (default: /var/lib/catalog-tagger/runs)
#   TAGGER      the catalog-tagger executable                    (default: catalog-tagger on PATH)
#   EXTRA_ARGS  more options for `catalog-tagger train`          (e.g. "--epochs 30 --device cuda")
set -euo pipefail

: "${MODEL_DIR:?set MODEL_DIR to the folder of the published model}"
RUNS_DIR=${RUNS_DIR:-/var/lib/catalog-tagger/runs}
TAGGER=${TAGGER:-catalog-tagger}
EXTRA_ARGS=${EXTRA_ARGS:-}

run="$RUNS_DIR/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RUNS_DIR"
# shellcheck disable=SC2086
"$TAGGER" -q train --out "$run" $EXTRA_ARGS

# Compare validation accuracy from the cards: the test set is for reporting, not for choosing.
val_accuracy() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"]["val_accuracy"])' "$1"; }
new=$(val_accuracy "$run/model.json")
old=0
[ -f "$MODEL_DIR/model.json" ] && old=$(val_accuracy "$MODEL_DIR/model.json")
echo "validation accuracy: new model $new, published model $old"
if python3 -c "import sys; sys.exit(0 if float('$new') >= float('$old') else 1)"; then
  mkdir -p "$MODEL_DIR"
  # Card first, then weights, each by rename: a reader sees a consistent pair or refuses a mismatch.
  cp "$run/model.json" "$MODEL_DIR/.model.json.new" && cp "$run/model.safetensors" "$MODEL_DIR/.model.safetensors.new"
  mv "$MODEL_DIR/.model.safetensors.new" "$MODEL_DIR/model.safetensors"
  mv "$MODEL_DIR/.model.json.new" "$MODEL_DIR/model.json"
  echo "published $run -> $MODEL_DIR"
else
  echo "kept the published model (new one is worse)"
fi
