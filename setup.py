"""mcore_align: preference alignment (DPO, KTO, CPO, ORPO, SimPO, RM) on Megatron-Core.

Version ranges here are what the code is written against (megatron-core: what is
tested, see below); `constraints.txt` pins the exact set that CI tests (torch 2.13.0 CPU build, megatron-core 0.16.1 on Python 3.11).
"""
from setuptools import find_packages, setup

setup(
    name="mcore_align",
    version="0.1.0",
    description="Preference-alignment training backend on NVIDIA Megatron-Core",
    packages=find_packages(include=["mcore_align", "mcore_align.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        # The code uses private megatron-core APIs (CPU mode, schedules, dist_checkpointing)
        # and is tested on 0.16.1 only: newer releases are admitted once the GPU check
        # script has passed on them, not before.
        "megatron-core>=0.16.1,<0.17",
        "transformers>=4.51",
        "safetensors>=0.4",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "psutil>=5.9",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        "test": ["pytest>=8", "peft>=0.13", "mpmath>=1.3"],
        "tensorboard": ["tensorboard>=2.15"],
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            "mcore-align-train=mcore_align.train:main",
        ]
    },
)
