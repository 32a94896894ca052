#!/usr/bin/env bash
# Nightly review job for cron, run after jobs/nightly-tag.sh: a workbook of the day's photos
# most worth a person's time (a random slice to measure the model, plus the most typical photo of each kind).
# Photos in any earlier workbook or CSV in REVIEW_DIR (handed out or filled) are not asked again.
#
#   OUTPUT_DIR  where nightly-tag.sh wrote tags.parquet           (default: /var/lib/catalog-tagger)
#   REVIEW_DIR  where workbooks are handed out and filled ones    (default: $OUTPUT_DIR/review)
#               come back (any *.xlsx / *.csv below it counts as reviewed; hidden files
#               and Office's owner files ~$name.xlsx, left while a workbook is open, do not)
#   BUDGET      photos per workbook                                (default: 200)
#   TAGGER      the catalog-tagger executable                      (default: catalog-tagger on PATH)
#   EXTRA_ARGS  more options for `catalog-tagger review`           (e.g. "--thumbnail-size 48")
#   FORMAT      xlsx or html                                       (default: xlsx)
set -euo pipefail

OUTPUT_DIR=${OUTPUT_DIR:-/var/lib/catalog-tagger}
REVIEW_DIR=${REVIEW_DIR:-$OUTPUT_DIR/review}
BUDGET=${BUDGET:-200}
TAGGER=${TAGGER:-catalog-tagger}
FORMAT=${FORMAT:-xlsx}
EXTRA_ARGS=${EXTRA_ARGS:-}

tags="$OUTPUT_DIR/tags.parquet"
[ -f "$tags" ] || { echo "no $tags yet: run nightly-tag.sh first" >&2; exit 2; }
mkdir -p "$REVIEW_DIR" "$OUTPUT_DIR/logs"
stamp=$(date -u +%Y%m%d)
out="$REVIEW_DIR/review-$stamp.$FORMAT"
log="$OUTPUT_DIR/logs/review-$(date -u +%Y%m%dT%H%M%SZ).log"

args=(-q review "$tags" --budget "$BUDGET" --out "$out" --seed "$stamp")
while IFS= read -r -d '' earlier; do
  args+=(--exclude "$earlier")
done < <(find "$REVIEW_DIR" -type f \( -name '*.xlsx' -o -name '*.csv' -o -name '*.html' \) ! -name '.*' ! -name '~$*' -print0 | sort -z)
# shellcheck disable=SC2206  # EXTRA_ARGS is meant to split into words
args+=($EXTRA_ARGS)

set +e
"$TAGGER" "${args[@]}" >>"$log" 2>&1
code=$?
set -e
reason=$(bash "$(dirname "$0")/last-error.sh" "$log")
echo "exit $code" >>"$log"
if [ "$code" -eq 0 ]; then
  echo "review workbook: $out"
else
  # Cron mails only what a job prints, and the tagger's words went to the log.
  echo "catalog-tagger review failed (exit $code): ${reason:-no message}; see $log" >&2
fi
exit "$code"
