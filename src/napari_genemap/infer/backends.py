"""Where a checkpoint's model runs: torch, or its ONNX export under ONNX Runtime or OpenVINO.

A runner takes windows (n, H, W, 3) uint8 and returns the float32 density of each window's centre
(n, genes, h, w): ``margin`` output pixels are dropped on every side, the tile engine's halo, before the
gene head (`PixNet.forward`). The exported graph takes the uint8 pixels themselves, so the cast, transpose
and scaling of `to_input` run inside it. An export is written once per checkpoint and margin, beside the
gene-map cache (``{cache_root}/exports/``, or $GENEMAP_EXPORT_DIR; named by the weights' sha256), and reused
by every later engine, tile service and dask worker; a failed export or compile falls back to torch with one
warning.

Which is the default was measured (``benchmarks/backends.py``, the README's "Speed" section): on a CPU,
"auto" is OpenVINO, in bfloat16 where the CPU computes it natively (AVX-512 BF16 or AMX), else in float32;
on CUDA, torch with float16 autocast.
"""

from __future__ import annotations

import functools
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
EXPORT_DIR_VARIABLE = "GENEMAP_EXPORT_DIR"  # where exports go instead (one folder for many gene-map caches)

Runner = Callable[[np.ndarray], np.ndarray]

logger = logging.getLogger(__name__)


def check_backend_name(name: object, source: str = "backend") -> str:
    """``name`` if it is one of `BACKENDS` (torch-free: settings are checked before anything runs)."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise GenemapInputError(f"{source} {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@functools.cache  # one answer per process: the CPU does not change, and every engine asks
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
    loaded,
    backend: str,
    device: str,
    margin: int,
    exports: str | os.PathLike | None,
    threads: int | None = None,
    shapes: tuple[tuple[int, int, int], ...] = (),
) -> tuple[Runner, str]:
    """A runner for the loaded checkpoint on ``device`` (a name in `device.DEVICES`) and the backend it
    really got (torch after a failed export); ``exports``: the folder of exported graphs (`exports_folder`).

    ``threads``: None lets each library choose (its physical cores); ``shapes``: the (n, H, W) windows the
    caller will send, prepared now rather than on the first call. An existing export is run without
    building the torch model (a lazily opened checkpoint then never imports torch)."""
    from ..device import device_type, resolve_device

    backend = resolve_backend(backend, device_type(device))
    if backend == "torch":
        return TorchRunner(loaded.model, resolve_device(device), margin, threads), backend
    try:
        if not loaded.digest or exports is None:
            raise ValueError("the checkpoint has no weights file to key an export by")
        path = export_onnx(loaded, margin, Path(exports))
        if backend == "onnxruntime":
            return OnnxRuntimeRunner(path, threads), backend
        precision = "bf16" if backend == "openvino-bf16" else "f32"
        return OpenVinoRunner(path, threads, precision, shapes), backend
    except GenemapInputError:  # the checkpoint itself is bad (found when its model is built): no backend helps
        raise
    except Exception as error:  # any export or compile failure: torch still gives the same maps
        reason = (str(error).splitlines() or [""])[0]
        warnings.warn(
            f"{backend} backend unavailable ({type(error).__name__}: {reason}); running the model in torch instead",
            GenemapDataWarning,
            stacklevel=2,
        )
        return TorchRunner(loaded.model, resolve_device(device), margin, threads), "torch"


class DihedralMean:
    """Test-time augmentation: a runner's maps averaged over the 8 dihedral views of each square window
    (4 rotations, each mirrored or not), every map turned back before the mean. 8 model calls a window.

    Exact on the map grid: a window side is a multiple of the stride, so a turned window's output pixels
    are the same blocks of input pixels, and the margin dropped is the same on every side."""

    VIEWS = tuple((turns, mirror) for turns in range(4) for mirror in (False, True))

    def __init__(self, run: Runner):
        self.run = run

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        if windows.shape[1] != windows.shape[2]:
            raise GenemapInputError(f"test-time augmentation needs square windows; got {windows.shape[1:3]}")
        total = None
        for turns, mirror in self.VIEWS:
            view = np.rot90(windows, turns, axes=(1, 2))
            density = np.asarray(self.run(np.ascontiguousarray(view[:, :, ::-1] if mirror else view)), np.float32)
            back = np.rot90(density[..., ::-1] if mirror else density, -turns, axes=(2, 3))
            total = back.astype(np.float64) if total is None else total + back
        assert total is not None  # eight views
        return (total / len(self.VIEWS)).astype(np.float32)


class TorchRunner:
    """The model in torch: float32 on the CPU, float16 autocast on CUDA."""

    def __init__(self, model, device, margin: int, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
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

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's own choice
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(windows, np.uint8)})[0]


class OpenVinoRunner:
    """The exported graph compiled by OpenVINO for this CPU, at ``precision`` "f32" or "bf16".

    It is compiled once per window shape, with that shape fixed: measured on the shipped model and a
    1792 px window (2 cores, bf16), a static graph runs in 0.55 s against 0.9 s for the dynamic one, and its
    first call takes 0.8 s against 2.4 s. The compiled blobs are cached beside the export, so a later start
    compiles nothing (0.44 s to load against 1.45 s to compile)."""

    MAX_SHAPES = 4  # compiled shapes kept (the engine sends one; a caller with ragged windows evicts the oldest)

    def __init__(self, path: Path, threads: int | None, precision: str, shapes=()):
        import openvino as ov

        self.core = ov.Core()
        self.core.set_property({"CACHE_DIR": os.fspath(path.parent / "openvino")})
        self.graph = self.core.read_model(os.fspath(path))
        self.config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.requests: dict[tuple[int, ...], object] = {}
        for shape in shapes:
            self.request(tuple(shape))

    def request(self, shape: tuple[int, ...]):
        """The infer request compiled for windows of ``shape`` (n, H, W)."""
        request = self.requests.pop(shape, None)
        if request is None:
            graph = self.graph.clone()
            graph.reshape({"pixels": [*shape, 3]})
            request = self.core.compile_model(graph, "CPU", self.config).create_infer_request()
            while len(self.requests) >= self.MAX_SHAPES:
                self.requests.pop(next(iter(self.requests)))
        self.requests[shape] = request  # most recently used last
        return request

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        request = self.request(tuple(windows.shape[:3]))
        # share_outputs=False (the default) copies the result out of the request's reused buffer
        return request.infer({0: np.ascontiguousarray(windows, np.uint8)})[0]


def exports_folder(cache_root: str | os.PathLike) -> Path:
    """Where exported graphs are kept: $GENEMAP_EXPORT_DIR, else ``exports/`` in the gene-map cache's root."""
    return Path(os.environ.get(EXPORT_DIR_VARIABLE) or Path(cache_root) / EXPORTS_FOLDER)


def export_path(folder: Path, digest: str, margin: int) -> Path:
    return folder / f"{digest[:24]}-margin{margin}-v{EXPORT_VERSION}.onnx"


def export_onnx(loaded, margin: int, folder: Path) -> Path:
    """The checkpoint's ONNX graph (uint8 NHWC pixels -> density of the centre), exported once."""
    path = export_path(folder, loaded.digest, margin)
    if path.is_file():
        return path
    import torch

    from ..models.registry import INPUT_MULTIPLE

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
