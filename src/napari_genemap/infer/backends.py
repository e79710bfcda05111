"""Where a checkpoint's model runs: torch, or its ONNX export under ONNX Runtime or OpenVINO.

A runner takes windows (n, H, W, 3) uint8 and returns the float32 density of each window's centre
(n, genes, h, w): ``margin`` output pixels are dropped on every side, the tile engine's halo, before the
gene head (`PixNet.forward`). The exported graph takes the uint8 pixels themselves, so the cast, transpose
and scaling of `to_input` run inside it. An export is written once per checkpoint and margin, beside the
gene-map cache (``{cache_root}/exports/``, named by the weights' sha256), and reused by every later engine,
tile service and dask worker; a failed export or compile falls back to torch with one warning.

Which is the default was measured (``benchmarks/backends.py``, the README's "Speed" section): on a CPU,
"auto" is OpenVINO, in bfloat16 where the CPU computes it natively (AVX-512 BF16 or AMX), else in float32;
on CUDA, torch with float16 autocast.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import GenemapDataWarning, GenemapInputError

#: The backends every choice offers (the CLI, the tile service); "auto" is the measured default.
BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "openvino-bf16")
EXPORT_VERSION = 1  # bump when the exported graph's inputs or outputs change meaning
EXPORTS_FOLDER = "exports"

Runner = Callable[[np.ndarray], np.ndarray]

logger = logging.getLogger(__name__)


def check_backend_name(name: object, source: str = "backend") -> str:
    """``name`` if it is one of `BACKENDS` (torch-free: settings are checked before anything runs)."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise GenemapInputError(f"{source} {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def cpu_computes_bf16() -> bool:
    """Whether OpenVINO finds native bfloat16 arithmetic on this CPU (else bf16 would be emulated: slow)."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no OpenVINO, or a CPU plugin it cannot load: torch serves
        return False


def resolve_backend(name: str, device_type: str, exportable: bool = True) -> str:
    """The backend ``name`` means on a device of ``device_type`` ("cpu", "cuda", "mps"). A model that is
    not ``exportable`` (built in memory: no weights file to key an export by) runs in torch on "auto"."""
    check_backend_name(name)
    if name == "auto":
        if device_type != "cpu" or not exportable:
            return "torch"
        return "openvino-bf16" if cpu_computes_bf16() else "openvino"
    if name != "torch" and device_type != "cpu":
        raise GenemapInputError(
            f"backend {name!r} runs on the CPU; on device {device_type!r} expected 'torch' or 'auto'"
        )
    return name


def build_runner(
    loaded, backend: str, device, margin: int, export_root: str | os.PathLike | None, threads: int
) -> tuple[Runner, str]:
    """A runner for the loaded checkpoint and the backend it really got (torch after a failed export)."""
    backend = resolve_backend(backend, device.type)
    if backend == "torch":
        return TorchRunner(loaded.model, device, margin), backend
    try:
        if not loaded.digest or export_root is None:
            raise ValueError("the checkpoint has no weights file to key an export by")
        path = export_onnx(loaded, margin, Path(export_root) / EXPORTS_FOLDER)
        if backend == "onnxruntime":
            return OnnxRuntimeRunner(path, threads), backend
        precision = "bf16" if backend == "openvino-bf16" else "f32"
        return OpenVinoRunner(path, threads, precision), backend
    except Exception as error:  # any export or compile failure: torch still gives the same maps
        reason = (str(error).splitlines() or [""])[0]
        warnings.warn(
            f"{backend} backend unavailable ({type(error).__name__}: {reason}); running the model in torch instead",
            GenemapDataWarning,
            stacklevel=2,
        )
        return TorchRunner(loaded.model, device, margin), "torch"


class TorchRunner:
    """The model in torch: float32 on the CPU, float16 autocast on CUDA."""

    def __init__(self, model, device, margin: int):
        self.model, self.device, self.margin = model.to(device).eval(), device, margin

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        import torch

        from ..models.predict import to_input

        with torch.inference_mode():
            pixels = to_input(windows, self.device)
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = self.model(pixels, self.margin)
            else:
                out = self.model(pixels, self.margin)
        return out.float().cpu().numpy()


class OnnxRuntimeRunner:
    """The exported graph on ONNX Runtime's CPU execution provider."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(windows, np.uint8)})[0]


class OpenVinoRunner:
    """The exported graph compiled by OpenVINO for this CPU, at ``precision`` "f32" or "bf16".

    The compiled blob is cached beside the export, so a later start compiles nothing."""

    def __init__(self, path: Path, threads: int, precision: str):
        import openvino as ov

        core = ov.Core()
        core.set_property({"CACHE_DIR": os.fspath(path.parent / "openvino")})
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.request = core.compile_model(os.fspath(path), "CPU", config).create_infer_request()

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        # share_outputs=False (the default) copies the result out of the request's reused buffer
        return self.request.infer({0: np.ascontiguousarray(windows, np.uint8)})[0]


def export_path(folder: Path, digest: str, margin: int) -> Path:
    return folder / f"{digest[:24]}-margin{margin}-v{EXPORT_VERSION}.onnx"


def export_onnx(loaded, margin: int, folder: Path) -> Path:
    """The checkpoint's ONNX graph (uint8 NHWC pixels -> density of the centre), exported once."""
    import torch

    from ..models.registry import INPUT_MULTIPLE

    path = export_path(folder, loaded.digest, margin)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    model = _PixelsToDensity(loaded.model, margin).eval()
    # the traced example must keep pixels after the margin is dropped; every size is dynamic afterwards
    side = -(-(2 * margin * loaded.stride + 256) // INPUT_MULTIPLE) * INPUT_MULTIPLE
    example = torch.zeros((1, side, side, 3), dtype=torch.uint8)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the tracer's notes on Python ints in shapes; dynamic_axes cover them
            torch.onnx.export(
                model,
                (example,),
                os.fspath(temporary),
                input_names=["pixels"],
                output_names=["density"],
                dynamic_axes={"pixels": {0: "n", 1: "height", 2: "width"}, "density": {0: "n", 2: "rows", 3: "cols"}},
                opset_version=17,
                dynamo=False,  # the TorchScript exporter: needs neither onnx nor onnxscript installed
            )
        os.replace(temporary, path)  # whole or not at all: a concurrent exporter writes the same bytes
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("exported the model to %s", path)
    return path


def _PixelsToDensity(model, margin: int):
    """The model behind `to_input`'s conversion, as one module to export."""
    from torch import nn

    class PixelsToDensity(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model(pixels.permute(0, 3, 1, 2).float() / 255, margin)

    return PixelsToDensity()
