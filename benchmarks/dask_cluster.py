"""``genemap predict`` on one process and on a dask cluster started from the command line: time, tiles, output.

Starts ``dask scheduler`` and ``--workers`` x ``dask worker ADDRESS --nthreads 1`` as a user would from a
shell, then runs ``genemap predict SLIDE`` twice, each with a fresh output store and tile cache: without
``--scheduler`` (its own one-worker LocalCluster) and with ``--scheduler ADDRESS``. It prints the wall time
of both commands; per worker, the tiles it predicted (the ``genemap-tiles`` events each task logs on the
scheduler, see ``infer/predict.py``) and its tasks and seconds computing them (the scheduler's task
stream); where each command's time went (from the INFO log lines of the client and the workers: the
client's engine, the workers' engines, the tiles, the coarser levels and the store); and whether the two
stores are identical: every level of the gene maps byte for byte, the H&E, the spots, the tables and the
prediction's attributes. ``--torch-threads N`` sets OMP/MKL_NUM_THREADS=N for both commands and the workers
(torch's results may differ in the last bits between thread counts; dask's workers default to 1).

Every process it started (the scheduler, the workers, ``genemap`` and the LocalCluster worker that one
starts) is stopped on the way out, also after an error, Ctrl-C or SIGTERM; it says so in one line.

The child processes run this checkout's code (``src`` first on PYTHONPATH), whatever napari-genemap the
virtual environment has installed. They log at GENEMAP_LOG_LEVEL=INFO to ``OUT/worker-N.log``,
``OUT/local.log`` and ``OUT/cluster.log``.

Run: ``.venv/bin/python benchmarks/dask_cluster.py [--slide ../shared/data/her2st/images/C3.jpg]
[--section S] [--mpp UM] [--model CKPT] [--out DIR] [--workers 2] [--torch-threads N] [--keep]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"
EVENT_TOPIC = "genemap-tiles"  # napari_genemap.infer.predict.EVENT_TOPIC (not imported: no torch here)
TASK_PREFIX = "_predict_tiles_on_worker"  # the key prefix of predict's tasks
START_TIMEOUT = 120.0  # seconds for the scheduler and the workers to come up
STOP_TIMEOUT = 20.0  # seconds a process group gets to end after SIGTERM, before SIGKILL
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) napari_genemap\.\S+ \w+: (.*)$", re.MULTILINE)
MARKS = {  # a phase ends with the first (client) or last (workers) log line holding these words
    "client engine": "with tissue to predict",  # predict.py, the client, before it starts or joins the cluster
    "worker engines": "engine ready for",  # predict.py, each worker's plugin
    "tiles": "closing the engine after",  # predict.py, each worker, when the run removes its plugin
}


def executable(name: str) -> str:
    """A console script of this environment (beside the interpreter), else the first on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"dask_cluster: cannot find the {name!r} command")
    return found


class Processes:
    """Child processes, each in its own session (so its own children, e.g. a LocalCluster's workers, are
    reached through its process group), stopped in reverse order of starting."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with log.open("w") as handle:  # the child keeps its own descriptor
            process = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        self.started.append((name, process))
        return process

    def stop(self, name: str, process: subprocess.Popen) -> None:
        group = process.pid  # a session leader's process group has its pid
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(group):
                if process.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=0.2)
                else:
                    time.sleep(0.2)
            if not _group_alive(group):
                break
            print(f"dask_cluster: {name} (process group {group}) did not end after {sig.name}", file=sys.stderr)
        process.poll()

    def stop_all(self) -> list[str]:
        """Stop every child group; the names of groups still alive afterwards (none, normally)."""
        for name, process in reversed(self.started):
            self.stop(name, process)
        return [f"{name} ({process.pid})" for name, process in self.started if _group_alive(process.pid)]


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie leader still counts as a member: reap it, then ask again
    with contextlib.suppress(ChildProcessError):
        os.waitpid(group, os.WNOHANG)
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def start_cluster(processes: Processes, out: Path, workers: int) -> str:
    """``dask scheduler`` on a free port (no dashboard) and ``workers`` x ``dask worker ADDRESS --nthreads 1``;
    the scheduler's address once every worker has joined."""
    from distributed import Client

    dask = executable("dask")
    scheduler_file = out / "scheduler.json"
    argv = [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file"]
    scheduler = processes.start("dask scheduler", [*argv, str(scheduler_file)], out / "scheduler.log")
    deadline = time.monotonic() + START_TIMEOUT
    while not scheduler_file.exists():
        if scheduler.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"dask_cluster: the scheduler did not start; see {out / 'scheduler.log'}")
        time.sleep(0.2)
    time.sleep(0.2)  # the file is written whole, but give the writer its close
    address = json.loads(scheduler_file.read_text())["address"]
    for index in range(workers):
        name = f"worker-{index}"
        argv = [dask, "worker", address, "--nthreads", "1", "--name", name, "--no-dashboard"]
        processes.start(f"dask worker {name}", argv, out / f"{name}.log")
    with Client(address, timeout=START_TIMEOUT) as client:
        client.wait_for_workers(workers, timeout=START_TIMEOUT)
    return address


def run_predict(processes: Processes, label: str, argv: list[str], out: Path) -> dict:
    """Run one ``genemap predict`` to its end: its wall seconds, output, start and end (epoch seconds)."""
    log = out / f"{label}.log"
    started, clock = time.time(), time.perf_counter()
    process = processes.start(f"genemap predict ({label})", argv, log)
    code = process.wait()
    seconds, ended = time.perf_counter() - clock, time.time()
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"dask_cluster: genemap predict ({label}) exited {code}:\n{text[-3000:]}")
    return {"seconds": seconds, "text": text, "started": started, "ended": ended}


def phases(run: dict, worker_logs: list[str]) -> dict[str, float]:
    """Seconds in each phase of one run, from its log lines and its workers' (empty where a line is missing)."""
    times: dict[str, list[float]] = defaultdict(list)
    for text in [run["text"], *worker_logs]:
        for stamp, message in LOG_LINE.findall(text):
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for phase, words in MARKS.items():
                if words in message and when >= run["started"]:
                    times[phase].append(when)
    if not all(times.get(phase) for phase in MARKS):
        return {}
    ends = [min(times["client engine"]), max(times["worker engines"]), max(times["tiles"]), run["ended"]]
    names = [*MARKS, "levels and store"]
    return {name: end - start for name, start, end in zip(names, [run["started"], *ends], ends, strict=False)}


def predicted_count(text: str) -> int | None:
    found = re.search(r"(\d+) predicted; cache", text)
    return int(found.group(1)) if found else None


def per_worker(client, since: float) -> dict[str, dict]:
    """Per worker name: tasks and compute seconds (task stream), tiles and predicted (events)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    names = {address: str(info.get("name", address)) for address, info in workers.items()}
    rows: dict[str, dict] = defaultdict(lambda: {"tasks": 0, "compute_s": 0.0, "tiles": 0, "predicted": 0, "events": 0})
    for name in names.values():
        rows[name]  # every worker gets a row, also one that did nothing
    for record in client.get_task_stream(start=since):
        if TASK_PREFIX not in str(record["key"]):
            continue
        row = rows[str(names.get(record["worker"], record["worker"]))]
        row["tasks"] += 1
        row["compute_s"] += sum(s["stop"] - s["start"] for s in record["startstops"] if s["action"] == "compute")
    for stamp, event in client.get_events(EVENT_TOPIC):
        if stamp < since:
            continue
        row = rows[str(names.get(event["worker"], event["worker"]))]
        row["events"] += 1
        row["tiles"] += event["tiles"]
        row["predicted"] += event["predicted"]
    return dict(sorted(rows.items()))


# --- comparing two stores ------------------------------------------------------------------------------------
def _levels(element) -> dict[str, object]:
    """A spatialdata image's arrays by scale: one DataArray, or a DataTree of scales."""
    if hasattr(element, "children"):
        return {scale: element[scale]["image"] for scale in sorted(element.children)}
    return {"scale0": element}


def _same_bytes(first, second) -> tuple[bool, str]:
    import numpy as np

    first, second = np.asarray(first), np.asarray(second)
    if first.dtype != second.dtype or first.shape != second.shape:
        return False, f"{first.dtype}{first.shape} vs {second.dtype}{second.shape}"
    same = np.array_equal(np.ascontiguousarray(first).view(np.uint8), np.ascontiguousarray(second).view(np.uint8))
    if same or first.dtype.kind not in "fiu":
        return same, ""
    difference = np.abs(first.astype(np.float64) - second.astype(np.float64))
    differing = np.count_nonzero(difference)
    return False, f"max |difference| {np.nanmax(difference):.3g}; {differing} of {difference.size} values differ"


def compare_stores(first: Path, second: Path) -> list[tuple[str, bool, str]]:
    """(what, identical, detail) for every element of two SpatialData stores and their 'genemap' attributes."""
    import numpy as np
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    one, two = sd.read_zarr(first), sd.read_zarr(second)
    checks: list[tuple[str, bool, str]] = []
    for kind in ("images", "labels", "points", "shapes", "tables"):
        mine, theirs = getattr(one, kind), getattr(two, kind)
        if set(mine) != set(theirs):
            checks.append((kind, False, f"{sorted(mine)} vs {sorted(theirs)}"))
            continue
        for key in sorted(mine):
            a, b = mine[key], theirs[key]
            if kind in ("images", "labels"):
                levels_a, levels_b = _levels(a), _levels(b)
                same_levels = list(levels_a) == list(levels_b)
                checks.append((f"{kind}/{key}: {len(levels_a)} levels", same_levels, ""))
                for scale in levels_a if same_levels else []:
                    level_a, level_b = levels_a[scale], levels_b[scale]
                    same, detail = _same_bytes(level_a.values, level_b.values)
                    coords = all(np.array_equal(level_a[c].values, level_b[c].values) for c in level_a.coords)
                    checks.append((f"{kind}/{key}/{scale} {tuple(level_a.shape)}", same and coords, detail))
                same_place = get_transformation(a, get_all=True) == get_transformation(b, get_all=True)
                checks.append((f"{kind}/{key} transformations", same_place, ""))
            elif kind == "shapes":
                columns = a.drop(columns="geometry").equals(b.drop(columns="geometry"))
                same = a.geom_equals_exact(b, tolerance=0).all() and columns
                checks.append((f"shapes/{key} ({len(a)} rows)", bool(same), ""))
            elif kind == "points":
                checks.append((f"points/{key}", a.compute().equals(b.compute()), ""))
            else:
                x_a = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
                x_b = b.X.toarray() if hasattr(b.X, "toarray") else np.asarray(b.X)
                same, detail = _same_bytes(x_a, x_b)
                frames = a.obs.equals(b.obs) and a.var.equals(b.var)
                checks.append((f"tables/{key} {a.shape}", same and frames, detail))
    attrs_a, attrs_b = one.attrs.get("genemap"), two.attrs.get("genemap")
    checks.append(("attrs['genemap'] (provenance, prediction)", attrs_a == attrs_b, ""))
    return checks


# --- main ------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DATA / "images" / "C3.jpg", help="image or HER2ST folder")
    parser.add_argument("--section", help="section, when --slide is a HER2ST folder")
    parser.add_argument("--mpp", type=float, help="µm per pixel, when the slide does not say")
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: genemap's, the shipped PixNet)")
    parser.add_argument("--out", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--workers", type=int, default=2, help="dask worker processes (--nthreads 1 each)")
    parser.add_argument("--torch-threads", type=int, help="OMP/MKL_NUM_THREADS for genemap and the workers")
    parser.add_argument("--keep", action="store_true", help="keep the stores and caches (default: removed)")
    args = parser.parse_args()

    out = (args.out or Path(tempfile.mkdtemp(prefix="genemap-dask-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("local.zarr", "local.cache", "cluster.zarr", "cluster.cache"):  # every run starts fresh
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "scheduler.json").unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["GENEMAP_LOG_LEVEL"] = "INFO"
    if args.torch_threads:
        env |= dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), str(args.torch_threads))
    processes = Processes(env)

    def terminate(signum, frame):  # SIGTERM: leave through the finally below, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background of a script
    genemap = executable("genemap")
    slide = [str(args.slide)] + (["--section", args.section] if args.section else [])
    slide += ["--mpp", str(args.mpp)] if args.mpp else []
    slide += ["--model", str(args.model.resolve())] if args.model else []
    load_before = os.getloadavg()
    results: dict = {"slide": slide, "workers": args.workers, "cpus": os.cpu_count(), "load_before": load_before}
    results["torch_threads"] = args.torch_threads
    left: list[str] = []
    try:
        print(f"starting dask scheduler and {args.workers} x dask worker --nthreads 1 (logs in {out})", flush=True)
        address = start_cluster(processes, out, args.workers)
        from distributed import Client

        with Client(address) as client:
            client.get_task_stream()  # the scheduler records tasks from now on

            def predict(label: str, *options: str) -> dict:
                stores = ["--out", str(out / f"{label}.zarr"), "--cache", str(out / f"{label}.cache")]
                print(f"genemap predict {' '.join([*slide, *options])} ...", flush=True)
                return run_predict(processes, label, [genemap, "predict", *slide, *stores, *options], out)

            local = predict("local")
            since = time.time()
            cluster = predict("cluster", "--scheduler", address)
            workers = per_worker(client, since)
            leftover = client.run(lambda dask_worker: [n for n in dask_worker.plugins if n.startswith("genemap")])
        checks = compare_stores(out / "local.zarr", out / "cluster.zarr")
        identical = all(same for _, same, _ in checks)
        results |= {
            "scheduler": address,
            "local_s": local["seconds"],
            "cluster_s": cluster["seconds"],
            "local_predicted": predicted_count(local["text"]),
            "cluster_predicted": predicted_count(cluster["text"]),
            "local_phases": phases(local, []),
            "cluster_phases": phases(cluster, [(out / f"worker-{i}.log").read_text() for i in range(args.workers)]),
            "per_worker": workers,
            "plugins_left_on_workers": leftover,
            "identical": identical,
            "checks": checks,
            "load_after": os.getloadavg(),
        }
    finally:
        left = processes.stop_all()
        if not args.keep:
            for name in ("local.zarr", "local.cache", "cluster.zarr", "cluster.cache"):
                shutil.rmtree(out / name, ignore_errors=True)
        started = len(processes.started)
        print(f"stopped all {started} process groups this script started" if not left else f"STILL RUNNING: {left}")

    (out / "dask_cluster.json").write_text(json.dumps(results, indent=1, default=str))
    print_report(results)
    return 0 if results["identical"] and not left else 1


def print_report(results: dict) -> None:
    cpus, (before, after) = results["cpus"], (results["load_before"][0], results["load_after"][0])
    print(f"\ngenemap predict {' '.join(results['slide'])}")
    print(f"{cpus} CPUs, load average {before:.1f} before, {after:.1f} after (other work shares them)")
    threads = results["torch_threads"]
    print(f"torch threads: {threads or 'as each process decides (see infer/predict.py)'}")
    print("\n| run | wall s | client engine | worker engines | tiles | levels and store | tiles predicted |")
    print("|---|---|---|---|---|---|---|")
    runs = {
        "local": "genemap predict (its own LocalCluster: one worker)",
        "cluster": f"genemap predict --scheduler ({results['workers']} x dask worker --nthreads 1)",
    }
    for label, title in runs.items():
        phase = results[f"{label}_phases"]
        spent = " | ".join(f"{phase[name]:.1f}" if name in phase else "-" for name in [*MARKS, "levels and store"])
        print(f"| {title} | {results[f'{label}_s']:.1f} | {spent} | {results[f'{label}_predicted']} |")
    print("\n| worker | tasks | tiles | predicted | compute s |")
    print("|---|---|---|---|---|")
    for name, row in results["per_worker"].items():
        print(f"| {name} | {row['tasks']} | {row['tiles']} | {row['predicted']} | {row['compute_s']:.1f} |")
    left = {worker: names for worker, names in results["plugins_left_on_workers"].items() if names}
    print(f"\ngenemap plugins left on the workers after the run: {left or 'none'}")
    print(f"\nidentical stores: {'yes' if results['identical'] else 'NO'}")
    for what, same, detail in results["checks"]:
        print(f"  {'same' if same else 'DIFFERENT'}  {what}{f' ({detail})' if detail else ''}")


if __name__ == "__main__":
    sys.exit(main())
