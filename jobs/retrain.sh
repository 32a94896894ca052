#!/usr/bin/env bash
# Re-train the garment model and publish it only if its validation accuracy is at least the current one's.
#
#   MODEL_DIR   the published model, as `tag --model MODEL_DIR` reads it   (required)
#               A symbolic link to one folder under MODEL_DIR.versions/; publishing
#               switches the link in one rename, so a reader sees the old model or the new
#               one, never a mix. A plain folder left by an older version of this script is
#               moved under MODEL_DIR.versions/ once, and the link takes its place.
#   RUNS_DIR    where training runs are kept                     (default: /var/lib/catalog-tagger/runs)
#   TAGGER      the catalog-tagger executable                    (default: catalog-tagger on PATH)
#   EXTRA_ARGS  more options for `catalog-tagger train`          (e.g. "--epochs 30 --device cuda")
set -euo pipefail

if [ -z "${MODEL_DIR:-}" ]; then echo "set MODEL_DIR to the published model (a link this script manages)" >&2; exit 2; fi  # 2: bad usage, as the tagger's
RUNS_DIR=${RUNS_DIR:-/var/lib/catalog-tagger/runs}
TAGGER=${TAGGER:-catalog-tagger}
EXTRA_ARGS=${EXTRA_ARGS:-}
MODEL_DIR=${MODEL_DIR%/}
versions="$MODEL_DIR.versions"
stamp=$(date -u +%Y%m%dT%H%M%SZ)

run="$RUNS_DIR/$stamp"
mkdir -p "$RUNS_DIR"
# shellcheck disable=SC2086
"$TAGGER" -q train --out "$run" $EXTRA_ARGS

# Compare validation accuracy from the cards: the test set is for reporting, not for choosing.
card_field() {
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["metrics"]["val_accuracy"] if sys.argv[2] == "val" else c["weights_file"])' "$1" "$2"
}
new=$(card_field "$run/model.json" val)
old=0
[ -f "$MODEL_DIR/model.json" ] && old=$(card_field "$MODEL_DIR/model.json" val)
echo "validation accuracy: new model $new, published model $old"
if ! python3 -c "import sys; sys.exit(0 if float('$new') >= float('$old') else 1)"; then
  echo "kept the published model (new one is worse)"
  exit 0
fi

mkdir -p "$versions"
if [ -d "$MODEL_DIR" ] && [ ! -L "$MODEL_DIR" ]; then
  # One-time migration of a plain folder: readers see no model for the moment between these
  # two renames (tag exits 4, it never mixes two models).
  mv "$MODEL_DIR" "$versions/before-$stamp"
  ln -s "$versions/before-$stamp" "$MODEL_DIR"
fi
# A complete new version first (card and the weights it names, readable by everyone) ...
staging="$versions/.$stamp.tmp"
rm -rf "$staging"
mkdir -p "$staging"
cp "$run/model.json" "$run/$(card_field "$run/model.json" weights)" "$staging/"
chmod 0755 "$staging"
chmod 0644 "$staging"/*
# The copy must match its card before anyone can be pointed at it.
python3 - "$staging/model.json" <<'PY'
import hashlib, json, pathlib, sys
card = pathlib.Path(sys.argv[1])
meta = json.loads(card.read_text())
digest = hashlib.sha256((card.parent / meta["weights_file"]).read_bytes()).hexdigest()
sys.exit(0 if digest == meta["weights_sha256"] else "the copied weights do not match their card")
PY
mv "$staging" "$versions/$stamp"
# ... then one rename switches the link (mv -T replaces the link itself, atomically).
ln -sfn "$versions/$stamp" "$versions/.current.tmp"
mv -Tf "$versions/.current.tmp" "$MODEL_DIR"
echo "published $run -> $MODEL_DIR -> $versions/$stamp"
