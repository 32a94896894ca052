#!/usr/bin/env bash
# Weekly learn job for cron: fine-tune the published model on every filled review file
# collected so far, and publish the result only when it is better.
#
# "Better" is judged on the labels the published model has never trained on (the card of a
# model made by `learn` lists the photos it learned from): there, the new model's
# cross-validated (out-of-fold) accuracy must beat the published model's plain accuracy.
# On photos the published model trained on, its accuracy is in-sample and proves nothing.
# A failed learn, no new labels, or a tie keep the published model as it is.
#
#   MODEL_DIR   where the published model lives (model.safetensors + model.json)  (required;
#               an existing folder, empty at first: the bundled model is then the one to beat.
#               A folder that is not there is a typo or an unmounted share: exit 2)
#   FILLED_DIR  filled review workbooks and CSVs (*.xlsx, *.csv)  (default: /var/lib/catalog-tagger/review/filled)
#               Hidden files and Office's owner files (~$name.xlsx, left while a workbook is
#               open) are not review files.
#   RUNS_DIR    where learn runs are kept                        (default: /var/lib/catalog-tagger/runs)
#   TAGS_FILE   a tag output whose photos nobody reviewed are learned too, labeled where the
#               model is sure (learn --catalog). Off unless set: up to a point more accuracy,
#               but its evidence is pessimistic and --target-precision finds fewer thresholds
#               (docs/review-loop.md)
#   TAGGER      the catalog-tagger executable                    (default: catalog-tagger on PATH)
#   EXTRA_ARGS  more options for `catalog-tagger learn`          (e.g. "--new-classes": names
#               reviewers type for items of none of the classes become classes of their own)
set -euo pipefail

if [ -z "${MODEL_DIR:-}" ]; then echo "set MODEL_DIR to the folder of the published model" >&2; exit 2; fi  # 2: bad usage, as the tagger's
if [ ! -d "$MODEL_DIR" ]; then
  echo "MODEL_DIR $MODEL_DIR is not a folder (a typo, or an unmounted share?); create it empty before the first publication" >&2
  exit 2
fi
FILLED_DIR=${FILLED_DIR:-/var/lib/catalog-tagger/review/filled}
RUNS_DIR=${RUNS_DIR:-/var/lib/catalog-tagger/runs}
TAGS_FILE=${TAGS_FILE:-}
TAGGER=${TAGGER:-catalog-tagger}
EXTRA_ARGS=${EXTRA_ARGS:-}

if [ ! -d "$FILLED_DIR" ]; then
  echo "FILLED_DIR $FILLED_DIR is not a folder (a typo, or an unmounted share?); kept the published model" >&2
  exit 2
fi
files=()
while IFS= read -r -d '' f; do files+=("$f"); done \
  < <(find "$FILLED_DIR" -type f \( -name '*.xlsx' -o -name '*.csv' \) ! -name '.*' ! -name '~$*' -print0 2>/dev/null | sort -z)
if [ "${#files[@]}" -eq 0 ]; then
  echo "no filled review files in $FILLED_DIR; kept the published model"
  exit 0
fi

run="$RUNS_DIR/learn-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RUNS_DIR"
init=()
if [ -f "$MODEL_DIR/model.json" ]; then
  init=(--init "$MODEL_DIR")
else
  echo "MODEL_DIR $MODEL_DIR holds no model.json yet; learning from the bundled model"
fi
catalog=()
[ -n "$TAGS_FILE" ] && catalog=(--catalog "$TAGS_FILE")   # set but missing: learn says so (exit 3)
# shellcheck disable=SC2086  # EXTRA_ARGS is meant to split into words
"$TAGGER" -q learn "${files[@]}" --out "$run" "${init[@]}" "${catalog[@]}" $EXTRA_ARGS   # set -e: a failed learn publishes nothing

verdict=$(python3 - "$run/model.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["metrics"]["comparison"]
if not c["n"]:
    print("keep: no label the published model has not already trained on")
elif c["cv_accuracy"] > c["init_accuracy"]:
    print(f"publish: {c['cv_accuracy']:.4f} cross-validated vs {c['init_accuracy']:.4f} on {c['n']} new labels")
else:
    print(f"keep: {c['cv_accuracy']:.4f} cross-validated vs {c['init_accuracy']:.4f} on {c['n']} new labels")
PY
)
echo "$verdict"
if [ "${verdict%%:*}" = "publish" ]; then
  bash "$(dirname "$0")/publish-model.sh" "$run" "$MODEL_DIR"
  echo "published $run -> $MODEL_DIR"
fi
