#!/usr/bin/env bash
# Nightly tagging job for cron: incremental over yesterday's output, one log file per run,
# the tagger's exit code passed through (see README "Exit codes") so cron can alert.
#
#   CATALOG_DIR   folder or manifest to tag              (required)
#   OUTPUT_DIR    where tags.parquet and logs live       (default: /var/lib/catalog-tagger)
#   MODEL_DIR     tag with this model once it holds one (what weekly-learn.sh publishes);
#                 the bundled model while it is empty    (default: none)
#                 It must exist (mkdir it once): a folder that is not there is a typo or
#                 an unmounted share, which stops the job (exit 2) instead of re-tagging
#                 every photo with the bundled model.
#   TAGGER        the catalog-tagger executable          (default: catalog-tagger on PATH)
#   MAX_ERROR_RATE  alert (exit 7) above this failed share (default: 0.05)
#   EXTRA_ARGS    more options for `catalog-tagger tag`  (e.g. "--id-col sku --model /models/v3")
set -euo pipefail

if [ -z "${CATALOG_DIR:-}" ]; then echo "set CATALOG_DIR to the folder or manifest to tag" >&2; exit 2; fi  # 2: bad usage, as the tagger's
OUTPUT_DIR=${OUTPUT_DIR:-/var/lib/catalog-tagger}
TAGGER=${TAGGER:-catalog-tagger}
MAX_ERROR_RATE=${MAX_ERROR_RATE:-0.05}
EXTRA_ARGS=${EXTRA_ARGS:-}
if [ -n "${MODEL_DIR:-}" ] && [ ! -d "$MODEL_DIR" ]; then
  echo "MODEL_DIR $MODEL_DIR is not a folder (a typo, or an unmounted share?); create it empty to tag with the bundled model until a model is published there" >&2
  exit 2
fi

mkdir -p "$OUTPUT_DIR/logs"
out="$OUTPUT_DIR/tags.parquet"
log="$OUTPUT_DIR/logs/tag-$(date -u +%Y%m%dT%H%M%SZ).log"

summary="$out.summary.json"
# --resume-if-possible: finish a run killed last night, but start over when that run used
# another model or options (a retrain was published, EXTRA_ARGS changed) instead of failing
# every night until someone deletes the shard store by hand.
args=(-q tag "$CATALOG_DIR" --out "$out" --resume-if-possible --max-error-rate "$MAX_ERROR_RATE")
# Yesterday's output is the baseline: unchanged photos are carried over, not re-decoded.
# The tagger writes the new file atomically, so reading the old one while writing is safe.
# An empty or much smaller source (an unmounted share) stops with exit 5 and leaves both
# files as they were, so the history survives the night.
if [ -f "$out" ]; then
  cp "$out" "$OUTPUT_DIR/previous.parquet"
  args+=(--incremental "$OUTPUT_DIR/previous.parquet")
fi
# A newly published model changes the rows' model ident: --incremental then re-tags every photo.
if [ -n "${MODEL_DIR:-}" ]; then
  if [ -f "$MODEL_DIR/model.json" ]; then
    args+=(--model "$MODEL_DIR")
  else
    echo "MODEL_DIR $MODEL_DIR holds no model.json yet; tagging with the bundled model" >>"$log"
  fi
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is meant to split into words
args+=($EXTRA_ARGS)

set +e
"$TAGGER" "${args[@]}" >>"$log" 2>&1
code=$?
set -e
reason=$(bash "$(dirname "$0")/last-error.sh" "$log")
# Exit 0 and 7 write a new output and summary; any other code leaves last night's summary
# in place, which must not be logged as if it were tonight's.
if [ "$code" -eq 0 ] || [ "$code" -eq 7 ]; then
  cat "$summary" >>"$log" 2>/dev/null || true
else
  echo "no output written tonight; $out is unchanged" >>"$log"
fi
echo "exit $code" >>"$log"
# Cron mails only what a job prints, and everything above went to the log.
if [ "$code" -ne 0 ]; then
  echo "catalog-tagger tag failed (exit $code): ${reason:-no message}; see $log" >&2
fi
exit "$code"
