"""On a CUDA GPU: PixNet's seconds per engine window by precision and batch, and DiffBulk stage 1's step time.

Runs where only torch, timm, safetensors (and diffusers, for stage 1) are installed: it imports the model
modules alone, not the slide readers. PixNet: the shipped checkpoint (785 genes, stride 4) on a real 1792 px
window (a 1024 px tile with its 384 px halo) of HER2ST section C2 at 2 µm/px, saved beforehand with
``--save-window``; the engine's margin (the halo dropped before the gene head). Each row: median of 10
timed calls after 3 warm-ups, ``torch.cuda.synchronize`` around each, the input copied from host memory
inside the timing (the engine's path), the map copied back. Accuracy: max |diff| / max of the map against
float32 (TF32 off). Stage 1: seconds per AdamW step of the EDM loss (`models.edm.edm_loss`, gene encoder on
a 785-gene panel) for the ``paper`` preset (pixel space, 224 px) and ``cpu-small`` (TAEF2 latents, 28 x 28),
bf16 autocast, random data of the right shapes (the step cost does not depend on the values).

    # here, once: save the window
    .venv/bin/python benchmarks/cuda_window.py --save-window .devicedata/window_C2.npy
    # there
    PYTHONPATH=src python3 benchmarks/cuda_window.py --window .devicedata/window_C2.npy --json $OUT/cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

CHECKPOINT = Path(__file__).resolve().parents[1] / "src" / "napari_genemap" / "checkpoints" / "pixnet-her2st"
WINDOW, MARGIN_PX = 1792, 384
DEVICE, REPEATS = "cuda", 10  # --device cpu --repeats 1: a quick check of the script itself


def save_window(path: Path) -> None:
    """The benchmark window of `benchmarks/backends.py` (C2, tissue), as uint8 (H, W, 3)."""
    from backends import read_section, tissue_window

    window = tissue_window(read_section("C2"), 2.0, WINDOW)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, window)
    print(f"saved {path}: {window.shape} {window.dtype}")


def load_pixnet(device):
    import torch
    from safetensors.torch import load_file

    from napari_genemap.models.pixnet import PixNet, PixNetConfig

    config = json.loads((CHECKPOINT / "config.json").read_text())
    model = PixNet.from_config(PixNetConfig.from_dict(config["architecture"]))
    state = {k: v.float() for k, v in load_file(str(CHECKPOINT / "model.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), torch


def timed(call, warmups: int = 3) -> float:
    import torch

    repeats = REPEATS

    def synchronize():
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmups):
        call()
    synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pixnet_rows(window: np.ndarray) -> list[dict]:
    import torch

    device = torch.device(DEVICE)
    model, _ = load_pixnet(device)
    margin = MARGIN_PX // model.stride
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def run(batch: int, dtype, channels_last: bool = False, net=model):
        pixels = np.ascontiguousarray(np.broadcast_to(window, (batch, *window.shape)))

        def call():
            with torch.inference_mode():
                x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if dtype is None:
                    out = net(x, margin)
                else:
                    with torch.autocast(DEVICE, dtype=dtype):
                        out = net(x, margin)
                return out.float().cpu().numpy()

        return call

    reference = run(1, None)()[0]
    rows = []
    for name, dtype, tf32, channels_last in (
        ("fp32", None, False, False),
        ("tf32", None, True, False),
        ("fp16 autocast (engine default)", torch.float16, False, False),
        ("bf16 autocast", torch.bfloat16, False, False),
        ("fp16 autocast, channels_last", torch.float16, False, True),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        net = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        many = DEVICE == "cuda" and (name == "fp32" or name.startswith("fp16 autocast ("))
        for batch in (1, 4, 8) if many else (1,):
            call = run(batch, dtype, channels_last, net)
            seconds = timed(call)
            out = call()[0]
            rows.append(
                {
                    "backend": name,
                    "batch": batch,
                    "s_per_window": seconds / batch,
                    "mpx_per_s": (WINDOW - 2 * MARGIN_PX) ** 2 * batch / seconds / 1e6,
                    "max_abs_diff_over_max": float(np.abs(out - reference).max() / reference.max()),
                }
            )
            print(rows[-1], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model.to(memory_format=torch.contiguous_format)
    if DEVICE != "cuda":
        return rows
    try:
        started = time.perf_counter()
        compiled = torch.compile(model)
        call = run(1, torch.float16, net=compiled)
        call()
        compile_s = time.perf_counter() - started
        seconds = timed(call)
        out = call()[0]
        rows.append(
            {
                "backend": "torch.compile fp16 autocast",
                "batch": 1,
                "s_per_window": seconds,
                "mpx_per_s": (WINDOW - 2 * MARGIN_PX) ** 2 / seconds / 1e6,
                "max_abs_diff_over_max": float(np.abs(out - reference).max() / reference.max()),
                "compile_s": compile_s,
            }
        )
        print(rows[-1], flush=True)
    except Exception as error:  # report, keep the other rows
        rows.append({"backend": "torch.compile fp16 autocast", "error": f"{type(error).__name__}: {error}"[:300]})
    rows.append({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20, "gpu": torch.cuda.get_device_name()})
    return rows


def stage1_step_row(name: str, batch: int) -> dict:
    """Seconds per AdamW step of stage 1's EDM loss at preset ``name`` (bf16 autocast, random data)."""
    import torch

    from napari_genemap.models.edm import EDMDenoiser, edm_loss, preset
    from napari_genemap.models.gene_encoder import GeneEncoder, GeneEncoderConfig

    device = torch.device(DEVICE)
    genes = [f"G{i}" for i in range(785)]
    config = preset(name)
    denoiser = EDMDenoiser(config).to(device)
    encoder = GeneEncoder(GeneEncoderConfig(dim=config.condition_dim)).to(device)
    encoder.add_genes(genes)
    optimiser = torch.optim.AdamW(list(denoiser.parameters()) + list(encoder.parameters()), lr=1e-4)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, device=device) * 0.5
    rng = np.random.default_rng(0)
    panels = encoder.batch_panels([(genes, rng.random(len(genes))) for _ in range(batch)])

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = edm_loss(denoiser, x, encoder(*panels)).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    seconds = timed(step)
    return {
        "preset": name,
        "batch": batch,
        "s_per_step": seconds,
        "images_per_s": batch / seconds,
        "parameters_M": sum(p.numel() for p in denoiser.parameters()) / 1e6,
    }


def stage1_rows() -> list[dict]:
    cases = (("paper", 32), ("paper", 64), ("cpu-small", 64)) if DEVICE == "cuda" else (("cpu-small", 2),)
    rows = []
    for name, batch in cases:
        rows.append(stage1_step_row(name, batch))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save-window", type=Path)
    parser.add_argument("--window", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-stage1", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    global DEVICE, REPEATS
    DEVICE, REPEATS = args.device, args.repeats
    if args.save_window:
        save_window(args.save_window)
        return
    window = np.load(args.window)
    result: dict = {"pixnet": pixnet_rows(window[0] if window.ndim == 4 else window)}
    if not args.skip_stage1:
        try:
            result["stage1"] = stage1_rows()
        except Exception as error:
            result["stage1"] = [{"error": f"{type(error).__name__}: {error}"[:300]}]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
