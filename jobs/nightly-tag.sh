#!/usr/bin/env bash
# Nightly tagging job for cron: incremental over yesterday's output, one log file per run,
# the tagger's exit code passed through (see README "Exit codes") so cron can alert.
#
#   CATALOG_DIR   folder or manifest to tag              (required)
#   OUTPUT_DIR    where tags.parquet and logs live       (default: /var/lib/catalog-tagger)
#   TAGGER        the catalog-tagger executable          (default: catalog-tagger on PATH)
#   MAX_ERROR_RATE  alert (exit 7) above this failed share (default: 0.05)
#   EXTRA_ARGS    more options for `catalog-tagger tag`  (e.g. "--id-col sku --model /models/v3")
set -euo pipefail

: "${CATALOG_DIR:?set CATALOG_DIR to the folder or manifest to tag}"
OUTPUT_DIR=${OUTPUT_DIR:-/var/lib/catalog-tagger}
TAGGER=${TAGGER:-catalog-tagger}
MAX_ERROR_RATE=${MAX_ERROR_RATE:-0.05}
EXTRA_ARGS=${EXTRA_ARGS:-}

mkdir -p "$OUTPUT_DIR/logs"
out="$OUTPUT_DIR/tags.parquet"
log="$OUTPUT_DIR/logs/tag-$(date -u +%Y%m%dT%H%M%SZ).log"

args=(-q tag "$CATALOG_DIR" --out "$out" --resume --max-error-rate "$MAX_ERROR_RATE")
# Yesterday's output is the baseline: unchanged photos are carried over, not re-decoded.
# The tagger writes the new file atomically, so reading the old one while writing is safe.
if [ -f "$out" ]; then
  cp "$out" "$OUTPUT_DIR/previous.parquet"
  args+=(--incremental "$OUTPUT_DIR/previous.parquet")
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is meant to split into words
args+=($EXTRA_ARGS)

set +e
"$TAGGER" "${args[@]}" >>"$log" 2>&1
code=$?
set -e
cat "$OUTPUT_DIR/tags.summary.json" >>"$log" 2>/dev/null || true
echo "exit $code" >>"$log"
exit "$code"
