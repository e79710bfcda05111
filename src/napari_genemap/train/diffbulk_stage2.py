"""DiffBulk stage 2, dense: fuse a frozen stage-1 U-Net's features with a PixNet's and train on measured spots.

``genemap train diffbulk-stage2 --config run.toml`` calls `train_diffbulk_stage2`. The model is
`models.diffbulk_dense.DiffBulkDense`: p starts from the PixNet checkpoint named by ``pathology`` (its
encoder and decoder, fine-tuned ``encoder_lr_factor`` slower) and the gene head from that PixNet's head; f
comes from the stage-1 checkpoint named by ``stage1`` (frozen) on tiles of stage 1's size. It is then trained
exactly like PixNet (`train.pixnet.train_pixnet`: the same windows, spot integrals, loss, validation and
checkpoint selection), so "does f add to p" is one switch, ``features``: "both", "pathology" (p alone,
trained the same way: the control) or "diffusion" (f alone).

The checkpoint holds everything a prediction needs (PixNet trunk, stage-1 U-Net, TAEF2's encoder, fusion,
head) and is a gene-map model like PixNet's: `genemap predict`, the tile engine and the viewer use it as is.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ..errors import GenemapDataWarning, GenemapInputError
from .config import TrainConfig, read_config_file, resolve_paths

Progress = Callable[[int, int, str], None]
FEATURE_CHOICES = ("both", "pathology", "diffusion")  # models.diffbulk_dense's, here without torch
HEADS = ("dense", "pooled")


@dataclass
class DiffBulkStage2Config(TrainConfig):
    """PixNet's training settings plus where the two frozen/pretrained parts come from."""

    stage1: str = ""  # a stage-1 run folder (or its checkpoint/)
    pathology: str = ""  # a PixNet checkpoint folder: p's start and the protocol; "" = ImageNet + a new decoder
    taef2: str = ""  # TAEF2's weights folder when stage 1 works in its latents; "" = the folder stage 1 used
    features: str = "both"  # "both", "pathology" (p only) or "diffusion" (f only)
    feature_width: int = 32  # channels per U-Net decoder stage after reduction
    head: str = "dense"  # "dense" (a gene map, trained like PixNet) or "pooled" (one vector per spot tile)
    steps: int = 300
    lr: float = 2e-4

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DiffBulkStage2Config:
        path = Path(path)
        config = cls.from_dict(read_config_file(path), source=str(path))
        return resolve_paths(config, path.parent, extra=("stage1", "pathology", "taef2"))

    def check(self, source: str = "config") -> None:
        super().check(source)
        if not str(self.stage1).strip():
            raise GenemapInputError(f"{source}: field 'stage1' is missing; name a DiffBulk stage-1 run folder")
        if self.features not in FEATURE_CHOICES:
            raise GenemapInputError(
                f"{source}: field 'features' is {self.features!r}; expected one of {', '.join(FEATURE_CHOICES)}"
            )
        if self.head not in HEADS:
            raise GenemapInputError(f"{source}: field 'head' is {self.head!r}; expected one of {', '.join(HEADS)}")
        if self.head == "pooled" and self.resume:
            raise GenemapInputError(f"{source}: field 'resume': a pooled stage 2 trains in one go; remove it")
        if self.stain_normalise:
            raise GenemapInputError(f"{source}: field 'stain_normalise': DiffBulk's stage 2 takes slides as they are")
        if self.gene_rank:
            raise GenemapInputError(f"{source}: field 'gene_rank': DiffBulk's stage 2 has a full gene head; remove it")
        if self.head == "pooled" and self.raw_loss != "log1p":
            raise GenemapInputError(f"{source}: field 'raw_loss': a pooled stage 2 trains on MSE alone; remove it")
        if self.feature_width < 8:
            raise GenemapInputError(f"{source}: field 'feature_width' is {self.feature_width}; expected at least 8")


def build_stage2_model(config: DiffBulkStage2Config, protocol=None):
    """The DiffBulk dense model a run starts from, and the protocol it predicts (the PixNet's when one is
    named); one-line errors for parts that do not fit together."""
    from ..data.protocols import get_protocol
    from ..models.checkpoint import load_checkpoint
    from ..models.diffbulk import load_stage1
    from ..models.diffbulk_dense import DiffBulkDense, DiffBulkDenseConfig
    from ..models.diffbulk_pooled import DiffBulkPooled
    from ..models.encoders import EncoderConfig
    from ..models.pixnet import PixNet, PixNetConfig
    from ..models.taef2 import FILES, TAEF2

    stage1 = load_stage1(config.stage1)
    tile = stage1.config.get("tile", {})
    tile_um = tile.get("tile_um")
    if not isinstance(tile_um, int | float) or tile_um <= 0:
        raise GenemapInputError(f"{stage1.path}: config holds no tile size ('tile.tile_um'); cannot use it")
    feature_tile = tile_um / config.mpp
    if abs(feature_tile - round(feature_tile)) > 1e-6:
        raise GenemapInputError(
            f"{stage1.path}: its {tile_um:g} µm tiles are {feature_tile:g} px at {config.mpp} µm/px; "
            "expected a whole number of pixels (train stage 1 with tile_um a multiple of mpp)"
        )
    feature_tile = round(feature_tile)
    if config.head == "pooled" and feature_tile % 32:
        raise GenemapInputError(
            f"{stage1.path}: its {feature_tile} px tiles (the pooled model's input) are not a multiple of 32 px"
        )
    if config.head == "dense" and config.window % math.lcm(32, feature_tile):
        raise GenemapInputError(
            f"window {config.window} px: expected a multiple of {math.lcm(32, feature_tile)} "
            f"(32 and stage 1's {feature_tile} px tiles)"
        )
    if config.pathology:
        pixnet_checkpoint = load_checkpoint(config.pathology)
        if pixnet_checkpoint.model_class != "PixNet":
            raise GenemapInputError(f"{config.pathology}: holds a {pixnet_checkpoint.model_class}; expected a PixNet")
        if pixnet_checkpoint.stain is not None:
            raise GenemapInputError(
                f"{config.pathology}: this PixNet takes stain-normalised input; DiffBulk's stage 2 needs one that "
                "takes slides as they are"
            )
        if not math.isclose(pixnet_checkpoint.mpp, config.mpp, rel_tol=1e-6):
            raise GenemapInputError(
                f"{config.pathology}: PixNet works at {pixnet_checkpoint.mpp} µm/px; the config asks {config.mpp}"
            )
        if protocol is not None and protocol.genes != pixnet_checkpoint.protocol.genes:
            raise GenemapInputError(f"{config.pathology}: PixNet predicts other genes than the run's protocol")
        protocol = pixnet_checkpoint.protocol
        pixnet = cast(PixNet, pixnet_checkpoint.model)
    else:
        if protocol is None:
            from ..io import counts_table, read_slide
            from .config import slide_name

            training = [
                counts_table(read_slide(s["path"], section=s.get("section")))
                for s in config.slides
                if slide_name(s) not in config.validation
            ]
            protocol = get_protocol(config.protocol, training)
        pixnet = PixNet(
            PixNetConfig(protocol.n_genes, EncoderConfig(config.encoder, config.weights), stride=config.stride)
        )
    stage1_mpp = tile_um / stage1.model.tile_px
    if not math.isclose(stage1_mpp, config.mpp, rel_tol=0.1):
        warnings.warn(
            f"{stage1.path}: stage 1 learned {stage1_mpp:g} µm/px tiles; stage 2 resamples its {config.mpp:g} µm/px "
            "windows to that scale. For features of the scale they were learned at, train stage 1 with "
            f"tile_um = {stage1.model.tile_px} x {config.mpp:g} = {stage1.model.tile_px * config.mpp:g}",
            GenemapDataWarning,
            stacklevel=2,
        )
    dense_config = DiffBulkDenseConfig(
        n_genes=protocol.n_genes,
        pathology=pixnet.config,
        edm=stage1.model.edm_config,
        latent=stage1.model.latent,
        feature_tile=feature_tile,
        feature_width=config.feature_width,
        features=config.features,
    )
    model = (DiffBulkPooled if config.head == "pooled" else DiffBulkDense)(dense_config)
    model.start_from_pixnet(pixnet)
    taef2_state = None
    if stage1.model.latent.space == "taef2":
        used = stage1.config.get("provenance", {}).get("taef2") or {}
        folder = config.taef2 or used.get("folder", "")
        if not folder or not Path(folder).is_dir():
            raise GenemapInputError(
                f"stage 1 works in TAEF2 latents: set 'taef2' to the folder with its weights (got {folder!r})"
            )
        digest = hashlib.sha256(b"".join((Path(folder) / name).read_bytes() for name in FILES.values())).hexdigest()
        if used.get("sha256") and used["sha256"] != digest:
            raise GenemapInputError(f"{folder}: other TAEF2 weights than stage 1 was trained with ({used['folder']})")
        taef2_state = TAEF2.from_folder(folder).encoder.state_dict()
    model.start_from_stage1(stage1.model.denoiser.state_dict(), taef2_state)
    return model, protocol, stage1


def train_diffbulk_stage2(
    config: DiffBulkStage2Config,
    *,
    progress: Progress | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Build (or resume) the stage-2 model; train a dense one as `train.pixnet.train_pixnet` trains PixNet, a
    pooled one on spot-centred tiles (`train_pooled`)."""
    from .pixnet import load_slides, mean_density, train_pixnet

    if config.resume:
        return train_pixnet(config, progress=progress, on_metrics=on_metrics, cancel=cancel)
    model, protocol, _ = build_stage2_model(config)
    slides, protocol = load_slides(config, protocol)
    if config.head == "pooled":
        return train_pooled(config, model, slides, protocol, progress=progress, on_metrics=on_metrics, cancel=cancel)
    if not config.pathology:
        from ..models.pixnet import set_output_scale

        training = [s for name, s in slides.items() if name not in config.validation]
        set_output_scale(model.head, mean_density(training, model.stride))
    return train_pixnet(
        config,
        slides=slides,
        protocol=protocol,
        progress=progress,
        on_metrics=on_metrics,
        cancel=cancel,
        model=model,
    )


def train_pooled(
    config: DiffBulkStage2Config,
    model,
    slides: dict,
    protocol,
    *,
    progress: Progress | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """DiffBulk's published stage 2: a `models.diffbulk_pooled.DiffBulkPooled` on one tile per measured spot
    (stage 1's tile, centred on the spot), MSE to the spot's protocol-normalised expression; random dihedral
    transforms and stain jitter as PixNet's windows get; the trunk ``encoder_lr_factor`` slower. Validation
    slides score it (mean per-gene Pearson over their spots); the best (else the last) step is saved."""
    import time

    import numpy as np
    import torch

    from ..data.windows import spot_crops
    from ..device import resolve_device
    from ..evaluate.metrics import summarise_unit
    from ..models.checkpoint import save_checkpoint
    from ..models.diffbulk_pooled import predict_tiles
    from ..models.predict import to_input
    from .pixnet import make_optimiser, run_provenance
    from .sampler import random_dihedral, stain_jitter
    from .schedule import warmup_cosine

    side = model.config.feature_tile
    train = [s for name, s in slides.items() if name not in config.validation]
    valid = [slides[name] for name in config.validation]
    if not train:
        raise GenemapInputError("every slide is a validation slide; nothing is left to train on")
    crops = np.concatenate([spot_crops(s, side) for s in train])  # uint8: 4 sections x ~600 spots = ~120 MB
    targets = torch.as_tensor(np.concatenate([s.targets for s in train]))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model.start_head(targets.mean(0))
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = make_optimiser(model, config)
    schedule = warmup_cosine(optimiser, config.steps)
    provenance = run_provenance(config)
    save_dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    best, history, started, cancelled, saved, running = -math.inf, [], time.perf_counter(), False, False, None
    for step in range(1, config.steps + 1):
        if cancel is not None and cancel():
            cancelled = True
            break
        model.train()
        index = rng.integers(len(crops), size=config.batch)
        pixels = random_dihedral(to_input(crops[index]).numpy(), rng)
        images = torch.from_numpy(np.stack([stain_jitter(one, rng) for one in pixels])).to(device)
        loss = torch.nn.functional.mse_loss(model(images), targets[index].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 5.0)
        optimiser.step()
        schedule.step()
        value = float(loss.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        if progress is not None:
            progress(step, config.steps, f"loss {running:.4f}")
        record: dict = {"step": step, "loss": value, "seconds": time.perf_counter() - started}
        if step % config.eval_every == 0 or step == config.steps:
            scores = {
                s.name: float(summarise_unit(predict_tiles(model, spot_crops(s, side)), s.targets)["PCC@M"])
                for s in valid
            }
            record["validation"] = scores
            score = float(np.nanmean(list(scores.values()))) if scores else float(step)
            if score > best:
                best = score
                metrics = {"step": step, "validation_pcc_mean": scores or None}
                save_checkpoint(
                    config.out,
                    model,
                    protocol=protocol,
                    mpp=config.mpp,
                    window=side,
                    provenance=provenance,
                    metrics=metrics,
                    dtype=save_dtype,
                )
                record["saved"] = saved = True
        history.append(record)
        if on_metrics is not None:
            on_metrics(record)
    return {
        "checkpoint": config.out if saved else None,
        "best_validation": best if valid and best > -math.inf else None,
        "steps": len(history),
        "cancelled": cancelled,
        "seconds": time.perf_counter() - started,
        "history": history,
    }
