"""Where models train and metrics run, chosen at run time, and how exactly.

`run_device()`: $ZOO_DEVICE if set (cpu, cuda, cuda:1, ...), else CUDA when there is one, else
the CPU. `set_determinism(deterministic)`: on CUDA, deterministic kernels only (cuBLAS's fixed
workspace, no cuDNN autotuning), so a rerun reproduces a model's bits on the same GPU type; off,
cuDNN picks the fastest kernels. On the CPU training is deterministic either way.
"""

from __future__ import annotations

import os

import torch


def run_device() -> torch.device:
    name = os.environ.get("ZOO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs this before its first call to pick reproducible reductions
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
