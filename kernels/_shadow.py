"""What this folder does when it is imported by its bare name `kernels` instead of `alphatoken.kernels`.

That happens when the repository root is on `sys.path` (`python -c ...` or a script run from the root) and
something imports `kernels`: transformers does, probing for the Hugging Face `kernels` package (its
`is_kernels_available()` reads the installed distribution's version, then runs `from kernels import
CUDAProperties, ...`). Without this the probe would get this folder and fail with an ImportError.

`hand_over(our_module)` looks for another `kernels` package on `sys.path` (skipping the repository root);
if there is one, it drops this folder's modules from `sys.modules` and loads that package as `kernels`,
so the bare name means what transformers expects. If there is none, this folder stays imported as a module
without `__version__`, which transformers' probe reads as "kernels is not installed".
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path or os.getcwd()))


def hand_over(ours: ModuleType) -> None:
    folder = _real(os.path.dirname(ours.__file__))
    root = os.path.dirname(folder)
    others = [p for p in sys.path if isinstance(p, str) and _real(p) != root]
    spec = importlib.machinery.PathFinder.find_spec(ours.__name__, others)
    if spec is None or spec.origin is None or _real(os.path.dirname(spec.origin)) == folder:
        return
    for name in [n for n in sys.modules if n == ours.__name__ or n.startswith(ours.__name__ + ".")]:
        module = sys.modules[name]
        if _real(getattr(module, "__file__", None) or folder).startswith(folder):
            del sys.modules[name]
    hub = importlib.util.module_from_spec(spec)
    sys.modules[ours.__name__] = hub  # the import statement that loaded this folder returns this entry
    try:
        spec.loader.exec_module(hub)
    except BaseException:
        sys.modules.pop(ours.__name__, None)
        raise
