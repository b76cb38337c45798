"""pytest-benchmark suite set-up (run it by naming the folder: `pytest benchmarks --benchmark-enable`).

The repository's pytest.ini collects `tests/` only and disables benchmarks by default (`--benchmark-disable`:
each benchmark body then runs once, as a quick check); naming this folder and passing `--benchmark-enable`
times it. As in tests/conftest.py, the Triton kernels run in Triton's interpreter on a CPU-only machine
(TRITON_INTERPRET must be set before alphatoken.kernels is imported).
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(int(os.environ.get("ALPHATOKEN_BENCH_THREADS", "1")))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the scripts beside this file import each other by name
    sys.path.insert(0, str(_HERE))
