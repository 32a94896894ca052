"""catalog-tagger: tag product photos with garment types."""

import os
from importlib.metadata import PackageNotFoundError, version

# Idle OpenMP threads sleep rather than spin (read once, when torch loads, so set here,
# before any module of ours imports it; a value the user set is kept). The model runs on a
# thread per core while decoding processes, other jobs or the next test share those cores:
# spinning threads then steal the cores they wait for. Measured on a busy 2-core machine:
# inference 342 img/s spinning against 1,925 on one thread, a fine-tune 135 s against 13 s
# (docs/performance.md); on an idle machine the two policies ran within noise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("catalog-tagger")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
