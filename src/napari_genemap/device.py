"""Which torch device to run on: "auto" is CUDA when present, else the CPU."""

from __future__ import annotations

from .errors import GenemapInputError

#: The devices every choice offers (CLI, Slide & model panel, training settings).
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto"):
    import torch

    if name not in DEVICES:
        raise GenemapInputError(f"device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
