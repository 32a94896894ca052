#!/usr/bin/env bash
# Publish the model in RUN_DIR (model.json + model.safetensors, as `learn` or `train` write it)
# as the model in MODEL_DIR, which `tag --model MODEL_DIR` reads (weekly-learn.sh calls this).
#
# The weights go in under a name of their own (model-SHA.safetensors), then the card that
# names them, each by rename: a kill at any moment leaves the old card with its own weights,
# or the new pair, never a card with weights it does not match. Weights no card names any
# more are removed last.
#
#   publish-model.sh RUN_DIR MODEL_DIR
set -euo pipefail

if [ "$#" -ne 2 ] || [ ! -f "$1/model.json" ]; then
  echo "usage: publish-model.sh RUN_DIR MODEL_DIR (RUN_DIR holding model.json and its weights)" >&2
  exit 2
fi
# The model folder itself may be new (the first publication), never its parent: a missing
# parent is a typo or an unmounted share, where tag --model would never look.
if [ ! -d "$2" ]; then
  if [ ! -d "$(dirname "$2")" ]; then
    echo "cannot publish to $2: its folder $(dirname "$2") does not exist (a typo, or an unmounted share?)" >&2
    exit 2
  fi
  mkdir "$2"
fi
python3 - "$1" "$2" <<'PY'
import json, os, shutil, sys

run, folder = sys.argv[1:]
card = json.load(open(os.path.join(run, "model.json")))
name = f"model-{card['weights_sha256'][:12]}.safetensors"
staged = os.path.join(folder, f".{name}.new")
shutil.copyfile(os.path.join(run, card.get("weights_file") or "model.safetensors"), staged)
os.replace(staged, os.path.join(folder, name))
card["weights_file"] = name
staged = os.path.join(folder, ".model.json.new")
with open(staged, "w") as f:
    json.dump(card, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
os.replace(staged, os.path.join(folder, "model.json"))
for old in os.listdir(folder):
    if old.endswith(".safetensors") and old != name and not old.startswith("."):
        os.unlink(os.path.join(folder, old))
PY
