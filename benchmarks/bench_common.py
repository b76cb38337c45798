"""Shared helpers of the benchmark scripts: timing, the stored-row schema, environment metadata, CSV I/O.

Every stored row is one measurement (one case, one provider) in the long format below, with the device, the
date and the library versions repeated in the row, so that rows from different runs can be concatenated and
plotted without losing where they came from (DESIGN §14).

Timing (`alphatoken.benchtools`, shared with `alphatoken bench` and re-exported here)
* CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed before every call, median and quantiles).
* CPU:  providers are interleaved round by round (a rotating order), each round times `inner` calls with a
  host clock, and the median over rounds is kept. On a machine shared with other work this is what keeps the
  *ratios* meaningful: every provider sees the same background load, in the same rounds.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from alphatoken.benchtools import peak_extra_mib, summarize, sync, time_cuda, time_interleaved  # noqa: F401

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Long-format schema shared by the kernel rows (bench="kernel") and the end-to-end rows (bench="step").
COLUMNS = [
    "bench",          # "kernel" | "step" | "matmul"
    "op",             # bilinear | fisher_norm | bilinear_fisher_norm | ghost_dot | step config label
    "provider",       # triton | triton_interp | reference | torch | torch_compile | materialized | cublas | plain | alphatoken
    "dtype",
    "N", "V", "d_in", "d_out",
    "median_ms", "q20_ms", "q80_ms",
    "flops", "tflops",
    "matmul_ms",      # the vendor matmul (cuBLAS on CUDA) of the same FLOPs, same dtype, same run
    "pct_of_matmul",  # 100 * matmul_ms / median_ms
    "speedup_vs_torch", "speedup_vs_materialized",
    "ratio_vs_plain",  # step rows: time / the plain SFT step measured in the same rounds
    "peak_mib",       # CUDA: extra peak memory over the inputs (torch.cuda.max_memory_allocated); CPU: empty
    "status",         # ok | skipped | error
    "note",
    "device", "date", "torch", "triton", "transformers", "alphatoken", "git_rev", "mode", "threads",
]


# --------------------------------------------------------------------------------------------- environment
def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception:
        return "absent"


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return "?"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores visible)"


def environment(device: torch.device, mode: str) -> Dict[str, str]:
    """The metadata columns repeated in every stored row."""
    return {
        "device": device_name(device),
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "alphatoken": _version("alphatoken"),
        "git_rev": git_rev(),
        "mode": mode,
        "threads": str(torch.get_num_threads()),
    }


def make_row(env: Dict[str, str], **fields) -> Dict[str, object]:
    row = {c: "" for c in COLUMNS}
    row.update(env)
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns {sorted(unknown)}; the schema is bench_common.COLUMNS")
    row.update(fields)
    if not row["status"]:
        row["status"] = "ok"
    return row


# ---------------------------------------------------------------------------------------------------- I/O
def write_csv(rows: Iterable[Dict[str, object]], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({c: _fmt(row.get(c, "")) for c in COLUMNS})
    return path


class IncrementalCSV:
    """Appends rows as they are measured (flushed), so that a run cut short keeps what it had."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", newline="")
            self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
            self._w.writeheader()
            self._f.flush()

    def add(self, row: Dict[str, object]) -> None:
        if self._f is not None:
            self._w.writerow({c: _fmt(row.get(c, "")) for c in COLUMNS})
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return ""
        return f"{v:.6g}"
    return str(v)


def fnum(v) -> Optional[float]:
    """A CSV cell as float, or None when empty."""
    if v in (None, ""):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
