#!/usr/bin/env bash
# The GPU path in one script (under 8 minutes on a CUDA machine): installs what is missing,
# then runs benchmarks/gpu_check.py (label agreement CPU vs GPU, bf16 training, tag
# --device cuda, tagging speed with every core decoding, time to 95% accuracy, Ray with a
# GPU actor where Ray is installed).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--quick] [--device cpu]
#
# OUT_DIR (default runs/gpu-check) receives gpu_check.md and gpu_check.json.
# Machines without internet: put wheels of the missing packages in $WHEELS (default .whl/)
# and Fashion-MNIST's four IDX files in $CATALOG_TAGGER_DATA. Without a GPU the same script
# runs on the CPU (CI runs it with --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
shift || true
python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}

# The package itself runs from this checkout: no build step, no network.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# What the package imports; torch and torchvision are used as the machine has them (its CUDA
# build), never replaced by pip.
missing=$("$python" - <<'EOF'
import importlib.util
need = {"click": "click", "pandas": "pandas", "pyarrow": "pyarrow", "PIL": "pillow", "tqdm": "tqdm",
        "safetensors": "safetensors", "matplotlib": "matplotlib", "platformdirs": "platformdirs",
        "openpyxl": "openpyxl", "cv2": "opencv-python-headless"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "installing: $missing"
    site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    if [ -d "$wheels" ]; then
        # shellcheck disable=SC2086
        "$python" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl
    else
        # shellcheck disable=SC2086
        "$python" -m pip install -q --target "$site" $missing
    fi
    export PYTHONPATH="$PYTHONPATH:$site"
fi

"$python" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
PYTHONUNBUFFERED=1 exec "$python" benchmarks/gpu_check.py --out "$out" "$@"
