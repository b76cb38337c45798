"""Running from the repository root: the top-level `kernels/` folder must not break
transformers, which probes for the Hugging Face `kernels` package under that bare name."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os
import sys
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import import_utils

cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
model = AutoModelForCausalLM.from_config(cfg).eval()
ids = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(0))
logits = model(input_ids=ids).logits
assert tuple(logits.shape) == (2, 7, 37) and bool(torch.isfinite(logits).all())
import kernels  # whatever transformers' probe got under the bare name
hub = getattr(kernels, "__version__", None) is not None
assert not hasattr(kernels, "bilinear") or not hub, "this repository's folder posed as the hub package"
ours = os.path.join(sys.argv[1], "kernels", "__init__.py")  # (a virtualenv may live inside the repository)
if import_utils.is_kernels_available():  # the hub package is installed: the bare name must be it
    assert hub and os.path.realpath(kernels.__file__) != os.path.realpath(ours), kernels.__file__
import alphatoken.kernels as K
assert os.path.realpath(K.__file__) == os.path.realpath(ours) and callable(K.bilinear)
print("OK", "hub" if hub else "no-hub")
"""


def test_transformers_builds_and_runs_a_llama_from_the_repository_root():
    env = dict(os.environ, PYTHONPATH="", TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith("OK"), run.stdout


NO_HUB = r"""
import sys
import importlib.machinery
import torch  # imported before the site folder leaves sys.path below
try:
    import triton  # noqa: F401
except ImportError:
    pass
hub = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if p not in ("", sys.argv[1])])
if hub is not None:  # hide the hub package's folder: this checks the machine without it
    sys.path = [p for p in sys.path if not hub.origin.startswith(p.rstrip("/") + "/") or p in ("", sys.argv[1])]
import kernels
import os
assert os.path.realpath(kernels.__file__) == os.path.realpath(os.path.join(sys.argv[1], "kernels", "__init__.py")), kernels.__file__
assert not hasattr(kernels, "__version__")  # transformers' probe reads "N/A": not available
print("OK")
"""


def test_without_the_hub_package_the_bare_name_stays_an_unversioned_module():
    env = dict(os.environ, PYTHONPATH="", TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", NO_HUB, str(ROOT)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "OK", run.stdout
