"""CPU backends side by side: seconds per 1792 px window, peak memory, and what each costs in accuracy.

The window: the engine's default (a 1024 px tile with its 384 px halo) of HER2ST section C2 at the model's
2 µm/px, a real H&E window with tissue. Each backend runs the shipped checkpoint (785 genes, stride 4) on it,
one window per call, with the machine's torch thread count; time is the median of 5 calls after 2 warm-up
calls; peak memory is the process's RSS high-water mark during those calls above its level before.
Accuracy: max |difference| / max of the map against torch float32 eager (the map of the tile's own pixels),
and, with ``--fold-model`` (a checkpoint trained without ``--held-out``), the held-out section's per-gene
Pearson over its spots (hist2st protocol, 785 genes, mean over genes, NaN genes omitted) computed through the
tile engine (`TileEngine` + `aggregate_circles` at the measured spots: the path of ``genemap predict`` +
``genemap aggregate``).

Backends: torch eager float32 with the gene head over the whole window (before), and over the tile only (the
engine's margin: every other row drops the halo before the head too); torch channels_last; torch.compile
(inductor; compile time reported); torch bfloat16 autocast; ONNX Runtime float32 (CPU EP); OpenVINO float32
and bfloat16; int8 post-training quantisation (ONNX Runtime's static QDQ, per-channel weights, calibrated on
windows of the fold's training sections only, never the held-out one) run by ONNX Runtime and by OpenVINO.

    .venv/bin/python benchmarks/backends.py --fold-model /path/to/pixnet-fold-C3 --held-out C3
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from napari_genemap.checkpoints import shipped_checkpoint
from napari_genemap.data.resample import ModelFrameReader
from napari_genemap.infer.backends import TorchRunner, build_runner, export_onnx
from napari_genemap.infer.grid import DEFAULT_HALO, DEFAULT_TILE
from napari_genemap.models.checkpoint import load_checkpoint

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")
CPU = torch.device("cpu")  # TorchRunner takes a torch device; build_runner a device name


def read_section(section: str):
    from napari_genemap.io import read_slide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader's notes on dropped spots
        return read_slide(DATA, section=section)


def tissue_window(sdata, mpp: float, side: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A side x side window at ``mpp`` centred on the spots' centre of mass (plus an offset): tissue."""
    from napari_genemap.io import slide_mpp, spot_geometry

    centers, _ = spot_geometry(sdata)
    reader = ModelFrameReader.from_sdata(sdata, mpp)
    x, y = centers.mean(0) * slide_mpp(sdata) / mpp + np.asarray(offset)
    top, left = int(y) - side // 2, int(x) - side // 2
    return reader.read(top, top + side, left, left + side)[None]


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(run, window: np.ndarray, repeats: int = 5) -> tuple[float, float, np.ndarray]:
    """(median seconds, peak RSS MiB above the start, output). ru_maxrss only grows, so each backend's
    peak is measured in a fresh child process (see `main`)."""
    before = max_rss_mib()
    for _ in range(2):
        out = run(window)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = run(window)
        times.append(time.perf_counter() - started)
    return float(np.median(times)), max_rss_mib() - before, out


class _Calibration:
    """ONNX Runtime's calibration reader: training windows only."""

    def __init__(self, windows: list[np.ndarray]):
        self.windows = iter(windows)

    def get_next(self):
        window = next(self.windows, None)
        return None if window is None else {"pixels": window}


def quantise_int8(loaded, margin: int, folder: Path, calibration: list[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = export_onnx(loaded, margin, folder)
    prepared = folder / "prepared.onnx"
    quant_pre_process(os.fspath(source), os.fspath(prepared), skip_symbolic_shape=True)
    target = folder / "int8.onnx"
    quantize_static(
        os.fspath(prepared),
        os.fspath(target),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=["Conv"],  # 95% of the FLOPs; ONNX Runtime's QLinearAdd fails on the broadcast adds
    )
    return target


def runner_for(name: str, loaded, margin: int, folder: Path, calibration_sections: list[str]):
    """(runner, seconds it took to make: export, compile or quantise)."""
    threads = torch.get_num_threads()
    started = time.perf_counter()
    if name == "torch fp32, head on whole window (before)":
        inner = TorchRunner(loaded.model, CPU, 0)
        run = lambda w: inner(w)[:, :, margin:-margin, margin:-margin]  # noqa: E731
    elif name == "torch fp32":
        run = TorchRunner(loaded.model, CPU, margin)
    elif name == "torch channels_last":
        model = loaded.model.to(memory_format=torch.channels_last)
        run = TorchRunner(model, CPU, margin)
    elif name == "torch.compile":
        model = torch.compile(loaded.model)
        run = TorchRunner(model, CPU, margin)
        run(np.zeros((1, 1792, 1792, 3), np.uint8))  # compiles for this shape
    elif name == "torch bf16 autocast":
        inner = TorchRunner(loaded.model, CPU, margin)

        def run(w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return inner(w)
    elif name in ("onnxruntime fp32", "openvino fp32", "openvino bf16"):
        backend = {"onnxruntime fp32": "onnxruntime", "openvino fp32": "openvino", "openvino bf16": "openvino-bf16"}
        run, got = build_runner(loaded, backend[name], "cpu", margin, folder, threads)
        assert got == backend[name], got
    elif name in ("onnxruntime int8", "openvino int8"):
        from napari_genemap.infer.backends import OnnxRuntimeRunner, OpenVinoRunner

        windows = [
            tissue_window(read_section(s), loaded.mpp, 1024, offset)
            for s in calibration_sections
            for offset in ((-300, -300), (300, 300))
        ]
        path = folder / "exports" / "int8.onnx"
        if not path.exists():
            path = quantise_int8(loaded, margin, folder / "exports", windows)
        run = OnnxRuntimeRunner(path, threads) if name == "onnxruntime int8" else OpenVinoRunner(path, threads, "f32")
    else:
        raise ValueError(name)
    return run, time.perf_counter() - started


BACKENDS = (
    "torch fp32, head on whole window (before)",
    "torch fp32",
    "torch channels_last",
    "torch bf16 autocast",
    "torch.compile",
    "onnxruntime fp32",
    "openvino fp32",
    "openvino bf16",
    "onnxruntime int8",
    "openvino int8",
)


def held_out_pcc(run_factory, fold, section: str, cache: Path) -> tuple[float, float]:
    """(mean PCC over genes, seconds) of the fold model on the held-out section through the tile engine."""
    from napari_genemap.evaluate.metrics import summarise_unit
    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_circles
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.io import counts_table, slide_mpp, spot_geometry

    sdata = read_section(section)
    started = time.perf_counter()
    engine = TileEngine(fold, sdata, cache, runner_factory=run_factory)
    try:
        centers, radii = spot_geometry(sdata)
        table = counts_table(sdata)
        source = GeneMapSource.from_engine(engine, slide_mpp(sdata))
        predicted = aggregate_circles(source, centers, radii, names=list(table.obs_names))
    finally:
        engine.close()
    seconds = time.perf_counter() - started
    truth = fold.protocol.normalise(fold.protocol.counts(table).astype(np.float64))
    summary = summarise_unit(np.asarray(predicted.X, np.float64), truth)
    return float(summary["PCC@M"]), seconds


def one(args) -> None:
    """One backend in this (fresh) process: prints one tab-separated result line."""
    loaded = load_checkpoint(args.model)
    margin = DEFAULT_HALO // loaded.stride
    folder = Path(args.work) / "shipped"
    window = tissue_window(read_section("C2"), loaded.mpp, DEFAULT_TILE + 2 * DEFAULT_HALO)
    reference = np.load(Path(args.work) / "reference.npy")
    run, setup = runner_for(args.one, loaded, margin, folder, ["B4", "C2", "C4", "C5"])
    seconds, memory, out = measure(run, window)
    error = float(np.abs(out - reference).max() / reference.max())
    pcc, pcc_seconds = float("nan"), float("nan")
    if args.fold_model and args.one in args.pcc.split(";"):
        fold = load_checkpoint(args.fold_model)
        training = [s for s in SECTIONS if s != args.held_out]
        fold_folder = Path(args.work) / "fold"
        fold_run, _ = runner_for(args.one, fold, margin, fold_folder, training)
        cache = Path(tempfile.mkdtemp(dir=args.work))
        pcc, pcc_seconds = held_out_pcc(lambda threads: (fold_run, args.one), fold, args.held_out, cache)
    print(f"RESULT\t{args.one}\t{seconds:.3f}\t{memory:.0f}\t{error:.2e}\t{pcc:.4f}\t{pcc_seconds:.0f}\t{setup:.1f}")


def main() -> None:
    import subprocess
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(shipped_checkpoint()))
    parser.add_argument("--fold-model", help="a checkpoint trained without --held-out, for the PCC column")
    parser.add_argument("--held-out", default="C3")
    parser.add_argument(
        "--pcc",
        default="torch fp32;openvino bf16",
        help="backends (semicolons) whose held-out PCC is measured: each predicts the whole held-out section",
    )
    parser.add_argument("--backends", default=";".join(BACKENDS), help="names separated by semicolons")
    parser.add_argument("--work", help="folder for exports and caches (default: a temporary one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="genemap-backends-"))
    loaded = load_checkpoint(args.model)
    margin = DEFAULT_HALO // loaded.stride
    window = tissue_window(read_section("C2"), loaded.mpp, DEFAULT_TILE + 2 * DEFAULT_HALO)
    np.save(work / "reference.npy", TorchRunner(loaded.model, CPU, margin)(window))
    print(
        f"# {window.shape[1]} px window of C2 at {loaded.mpp} µm/px, {len(loaded.genes)} genes, "
        f"{torch.get_num_threads()} threads; held-out PCC on {args.held_out if args.fold_model else '-'}"
    )
    print("| backend | s / window | speed-up | peak MiB | max abs diff / max | held-out PCC | ΔPCC | setup s |")
    print("|---|---|---|---|---|---|---|---|")
    base_seconds = base_pcc = None
    for name in args.backends.split(";"):
        command = [sys.executable, __file__, "--one", name, "--model", args.model, "--work", str(work)]
        if args.fold_model:
            command += ["--fold-model", args.fold_model, "--held-out", args.held_out, "--pcc", args.pcc]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
        if not lines:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"| {name} | failed: {reason[:150]} | | | | | | |", flush=True)
            continue
        _, _, seconds, memory, error, pcc, _, setup = lines[0].split("\t")
        base_seconds = base_seconds or float(seconds)
        if base_pcc is None and pcc != "nan":
            base_pcc = float(pcc)
        print(
            f"| {name} | {float(seconds):.2f} | {base_seconds / float(seconds):.1f}x | {memory} | {error} | {pcc} | "
            f"{float(pcc) - base_pcc if base_pcc is not None else float('nan'):+.4f} | {setup} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
