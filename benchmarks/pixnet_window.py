"""PixNet on one 2048 x 2048 window on this machine's CPU: time and peak memory.

The shipped architecture (EfficientNet-Lite0 encoder, 785 genes, stride 4) with random weights (the cost
does not depend on them), float32, ``torch.inference_mode``; three timed runs after one warm-up.
Run: ``.venv/bin/python benchmarks/pixnet_window.py [--size 2048] [--genes 785] [--stride 4]``.
"""

import argparse
import threading
import time

import psutil
import torch

from napari_genemap.models.encoders import EncoderConfig
from napari_genemap.models.pixnet import PixNet, PixNetConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--genes", type=int, default=785)
    parser.add_argument("--stride", type=int, default=4)
    args = parser.parse_args()
    process = psutil.Process()
    model = PixNet(PixNetConfig(args.genes, EncoderConfig(weights="random"), stride=args.stride)).eval()
    image = torch.rand(1, 3, args.size, args.size)
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = []
    with torch.inference_mode():
        for _ in range(4):
            started = time.perf_counter()
            out = model(image)
            times.append(time.perf_counter() - started)
    stop.set()
    sampler.join()
    best, mean = min(times[1:]), sum(times[1:]) / 3
    print(
        f"PixNet {args.size}^2 window -> {tuple(out.shape[1:])} map, {torch.get_num_threads()} CPU threads: "
        f"{mean:.2f} s per window (best {best:.2f} s, {args.size**2 / best / 1e6:.2f} MPx/s); "
        f"peak RSS +{(peak[0] - baseline) / 2**20:.0f} MiB over the loaded model ({baseline / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
