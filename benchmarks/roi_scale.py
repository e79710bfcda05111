"""ROIs at scale: 10^4 and 10^5 random circles x 785 genes from a finished prediction store.

The store is the bundled sample (2048 x 2048 px at 0.685 µm/px) predicted with the shipped model
(``genemap predict``; 785 genes, a 176 x 176 map), built once under ``--cache`` and reused. Circles: centres
uniform over the slide, radii log-uniform in 10-200 µm, seed fixed. Each measurement runs in a fresh child
process, so its peak memory (``ru_maxrss`` from ``wait4``) is its own:

- in-process: ``aggregate_circles(read_prediction(store), ...)`` in a process that has already imported
  everything and aggregated 10 circles (zarr's and the thread pools' first calls); the time is that call alone;
- CLI: ``genemap aggregate STORE --circles C.csv --out T.{parquet,csv,h5ad}`` end to end (Python start,
  imports, reading the store and the circles, aggregating, writing). The 1-circle row is the fixed cost.

``--reference REV`` also times the implementation of a git revision (e.g. d4cc225, before this work),
extracted with ``git archive`` into a temporary folder (the repository is not touched).
Run: ``.venv/bin/python benchmarks/roi_scale.py [--cache DIR] [--sizes 10000 100000] [--repeats R]
[--reference REV]``. With ``--repeats`` the fastest of R runs is shown. Wall times on a shared machine depend
on what else runs; the CPU seconds (user + system, all threads) beside them much less, and the table gives
the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
RADIUS_UM = (10.0, 200.0)


def build_store(cache: Path, python: str, env: dict) -> Path:
    """The sample's prediction store under ``cache`` (predicted once; later runs reuse it)."""
    store = cache / "sample_prediction.zarr"
    if (store / "zarr.json").is_file():
        return store
    from napari_genemap.sample import sample_root

    cache.mkdir(parents=True, exist_ok=True)
    slide = sample_root() / "images" / "B4_crop.jpg"
    command = [python, "-m", "napari_genemap.cli", "predict", str(slide), "--out", str(store), "--device", "cpu"]
    print("predicting the sample once:", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)
    return store


def circles_file(folder: Path, n: int, size: tuple[int, int], mpp: float) -> Path:
    """n circles as the CLI reads them (x, y in slide pixels, radius_um)."""
    import pandas as pd

    path = folder / f"circles_{n}.csv"
    if not path.is_file():
        rng = np.random.default_rng(SEED)
        height, width = size
        radius = np.exp(rng.uniform(np.log(RADIUS_UM[0]), np.log(RADIUS_UM[1]), n))
        x, y = rng.uniform(0, width, n), rng.uniform(0, height, n)
        pd.DataFrame({"x": x, "y": y, "radius_um": radius}).to_csv(path, index=False)
    return path


def child(command: list[str], env: dict) -> tuple[float, float, float, str]:
    """Run a child process: (seconds, its CPU seconds (user + system), its peak resident memory in GB,
    its stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # reaped here: its own rusage, not all children's
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err.read()[-3000:]}")
        return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, out.read()


def in_process(store: str, circles: str, reference_src: str | None, repeats: int) -> None:
    """The child of the in-process measurement: prints JSON (the fastest call's seconds and CPU seconds)."""
    import resource
    import warnings

    import pandas as pd

    warnings.simplefilter("ignore")

    if reference_src:
        sys.path.insert(0, reference_src)
    from napari_genemap.infer.aggregate import aggregate_circles, read_prediction

    source = read_prediction(store)
    table = pd.read_csv(circles)
    centers = table[["x", "y"]].to_numpy(float)
    radii = table["radius_um"].to_numpy(float) / source.slide_mpp
    aggregate_circles(source, centers[:10], radii[:10])  # first calls: zarr, thread pools
    best = (float("inf"), float("nan"))
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        result = aggregate_circles(source, centers, radii)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        assert result.shape == (len(radii), len(source.genes))
        del result
        best = min(best, (seconds, cpu))
    print(json.dumps({"seconds": best[0], "cpu": best[1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "genemap-roi-scale"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--formats", nargs="+", default=["parquet", "csv", "h5ad"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the fastest is shown")
    parser.add_argument("--reference", metavar="REV", help="also time this git revision's implementation")
    parser.add_argument("--reference-sizes", type=int, nargs="+", help="sizes for the reference (default: --sizes)")
    parser.add_argument("--child", nargs=3, metavar=("STORE", "CIRCLES", "SRC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        in_process(args.child[0], args.child[1], args.child[2] or None, args.repeats)
        return

    from napari_genemap.infer.aggregate import read_prediction

    python = sys.executable
    cache = Path(args.cache)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    store = build_store(cache, python, env)
    source = read_prediction(store)
    size = tuple(int(round(side * source.pixel_size)) for side in source.shape)
    print(
        f"store {store}: {len(source.genes)} genes, map {source.shape[0]} x {source.shape[1]} px "
        f"({source.pixel_size:.2f} slide px each, {size[1]} x {size[0]} slide px at {source.slide_mpp:.4f} µm/px); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    implementations = [("this", ROOT / "src")]
    scratch = tempfile.TemporaryDirectory()
    if args.reference:
        folder = Path(scratch.name) / "reference"
        folder.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.reference, "src"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        implementations.append((args.reference, folder / "src"))
    rows = []

    def report(label: str, n: int, what: str, seconds: float, cpu: float, peak: float) -> None:
        rows.append((label, n, what, seconds, cpu, peak))
        print(f"  {label} {n:>7,} {what}: {seconds:.2f} s ({cpu:.2f} CPU s), peak {peak:.2f} GB", flush=True)

    with scratch:
        work = Path(scratch.name)
        for label, src in implementations:
            child_env = {**env, "PYTHONPATH": str(src)}
            sizes = args.sizes if label == "this" else (args.reference_sizes or args.sizes)
            for n in [1, *sizes]:
                circles = circles_file(cache, n, size, source.slide_mpp)
                if n > 1:
                    reference = str(src) if label != "this" else ""
                    command = [python, __file__, "--child", str(store), str(circles), reference]
                    _, _, peak, out = child([*command, "--repeats", str(args.repeats)], child_env)
                    result = json.loads(out.strip().splitlines()[-1])
                    report(label, n, "in-process aggregate_circles", result["seconds"], result["cpu"], peak)
                for fmt in args.formats if label == "this" else ["csv"]:  # before: the CLI wrote CSV only
                    out_path = work / f"table_{label}_{n}.{fmt}"
                    command = [python, "-m", "napari_genemap.cli", "aggregate", str(store), "--circles", str(circles)]
                    runs = [
                        child([*command, "--out", str(out_path), "--overwrite"], child_env) for _ in range(args.repeats)
                    ]
                    seconds, cpu, peak, _ = min(runs)
                    megabytes = out_path.stat().st_size / 1e6
                    report(label, n, f"CLI -> .{fmt} ({megabytes:,.0f} MB)", seconds, cpu, max(r[2] for r in runs))
                    out_path.unlink()
    print()
    print(f"{'code':>8} {'circles':>8}  {'what':<30} {'seconds':>8} {'CPU s':>8} {'peak GB':>8}")
    for label, n, what, seconds, cpu, peak in rows:
        print(f"{label:>8} {n:>8,}  {what:<30} {seconds:8.2f} {cpu:8.2f} {peak:8.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); the 1-circle rows are the")
    print("command's fixed cost (Python, imports, opening the store)")


if __name__ == "__main__":
    main()
