"""megatron_hdpissa: high-rank distributed PiSSA fine-tuning on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_hdpissa",
    version="0.1.0",
    description="HD-PiSSA (high-rank distributed PiSSA) adapters and optimizer for megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_hdpissa", "megatron_hdpissa.*"]),
    python_requires=">=3.10",
    # NVIDIA apex is detected at run time and never declared: the registry name `apex` is an
    # unrelated package. torch is pinned by the Makefile (CPU 2.13.0) before this installs.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.45",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "gguf>=0.10", "accelerate", "matplotlib>=3.7", "peft"],
        "material": ["gguf>=0.10", "accelerate"],
        "plots": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "hdpissa-finetune=megatron_hdpissa.training.finetune:cli",
            "hdpissa-convert-hf-to-megatron=megatron_hdpissa.cli.convert_hf_to_megatron:main",
            "hdpissa-convert-megatron-to-hf=megatron_hdpissa.cli.convert_megatron_to_hf:main",
            "hdpissa-effective-rank=megatron_hdpissa.cli.effective_rank:main",
            "hdpissa-plot-curves=megatron_hdpissa.cli.plot_curves:main",
        ],
    },
)
