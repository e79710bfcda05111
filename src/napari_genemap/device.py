"""Which torch device to run on: "auto" is CUDA when present, else the CPU."""

from __future__ import annotations

import ctypes.util
import functools
import sys
from pathlib import Path

from .errors import GenemapInputError

#: The devices every choice offers (CLI, Slide & model panel, training settings).
DEVICES = ("auto", "cpu", "cuda", "mps")


def check_device_name(name: object, source: str = "device") -> str:
    """``name`` if it is one of `DEVICES` (torch-free: settings are checked before anything runs)."""
    if not isinstance(name, str) or name not in DEVICES:
        raise GenemapInputError(f"{source} {name!r}: expected one of {', '.join(DEVICES)}")
    return name


def resolve_device(name: str = "auto"):
    """The torch device ``name`` means here; one line when it names hardware this machine lacks."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
        raise GenemapInputError(
            f"device 'cuda': no CUDA GPU is available here ({built}); expected 'auto' or 'cpu' on this machine"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise GenemapInputError("device 'mps': Apple's Metal (MPS) is not available here; expected 'auto' or 'cpu'")
    return torch.device(name)


def device_type(name: str = "auto") -> str:
    """The kind of device ("cpu", "cuda" or "mps") ``name`` means here. Torch is imported only when a CUDA
    driver could be present: a process that runs an exported graph on the CPU (the tile service) then
    starts without torch, 1.4 s sooner on this project's 2-core machine."""
    check_device_name(name)
    if name == "cpu" or (name == "auto" and not _cuda_driver_possible()):
        return "cpu"
    return resolve_device(name).type


@functools.cache
def _cuda_driver_possible() -> bool:
    """False only where CUDA cannot run: Linux without NVIDIA's kernel driver and without libcuda (torch's
    own check needs both); elsewhere torch is asked."""
    if not sys.platform.startswith("linux"):
        return True
    return Path("/proc/driver/nvidia/version").exists() or ctypes.util.find_library("cuda") is not None
