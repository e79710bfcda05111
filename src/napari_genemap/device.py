"""Which torch device to run on: "auto" is CUDA when present, else the CPU."""

from __future__ import annotations


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
