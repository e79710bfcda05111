"""DiffBulk stage 1: train the EDM denoiser to draw H&E tiles given their measured expression.

``genemap train diffbulk-stage1 --config run.toml`` calls `train_diffbulk_stage1`. Training pairs are
spot-centred tiles (`data.pseudobulk.spot_tiles`, ``tile_um`` µm, resampled to the model's tile size: 224 px
for TAEF2 latents, ``pixel_fallback`` px in pixel space) with the protocol's values of the spots inside
(`normalise_tiles`). Tiles are encoded once and cached (`data.latents`) in ``<out>/latents``.

Each step: a batch of tiles with replacement; the masking switch drawn **per sample** (probability
``p_drop``, `models.edm.keep_condition`); each kept sample conditions on a random subset of the panel
(a fraction drawn uniformly in [``panel_fraction_min``, ``panel_fraction_max``], at most
``max_condition_genes`` genes when that is set) with its values, so the encoder learns to take any panel.
Kept and dropped samples go through `models.edm.edm_loss` as two sub-batches (the gene encoder then runs
only on the kept half; the U-Net has GroupNorm only, so the split changes no sample's output); the loss is
their sample-weighted mean, with EDM2's learned uncertainty. AdamW, linear warm-up, then a constant rate.

Every ``eval_every`` steps (and at the last): the validation loss per noise band (`BANDS`: EDM's
lambda-weighted MSE, fixed noise and sigmas from a fixed seed, conditioned on the whole panel and
unconditioned) on the validation slides' tiles (at most ``validation_tiles``; the training tiles when no
slide is held out), and the checkpoint with the training state saved atomically in ``<out>/checkpoint``
(`models.diffbulk`). Every ``preview_every`` steps a PNG grid is written to ``<out>/previews``: top row the
preview spot's own tile (through the latent space) then images generated for its measured profile
(Heun, ``preview_steps``, guidance ``guidance``), bottom row unconditioned images, from the same noise
every time. Cancelling stops before the next step; the last saved checkpoint stays. Under ``torchrun
--nproc_per_node N`` the same run is shared by N processes (`train.distributed`: every rank draws the whole
batch's random choices, computes its shard, DistributedDataParallel averages the gradients; rank 0 encodes
the tiles, validates, saves and reports), which matches one process with the same ``batch_size``. Resuming restores
weights, AdamW moments, the step and every random generator, so a resumed run draws the same batches,
gene subsets, sigmas and noise as one that never stopped; its weights agree to float rounding (MKL and
oneDNN on a CPU round differently from one process history to the next: ~1e-6 after 8 steps).

Nothing here downloads: without ``taef2`` (the folder with TAEF2's weights) a preset that works in TAEF2
latents falls back to pixel space at ``pixel_fallback`` px.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..device import check_device_name
from ..errors import GenemapInputError
from . import distributed
from .config import check_fields, read_config_file, resolve_paths, slide_name
from .resume import duration, optimiser_groups, optimiser_state_tensors, restore_optimiser

if TYPE_CHECKING:
    from ..data.protocols import Protocol
    from ..models.diffbulk import DiffBulkStage1, LatentSpace

Progress = Callable[[int, int, str], None]
logger = logging.getLogger(__name__)

#: Noise bands of the validation loss: name, lowest and highest sigma (log-uniform inside).
BANDS: tuple[tuple[str, float, float], ...] = (
    ("sigma<0.2", 0.002, 0.2),
    ("0.2-1", 0.2, 1.0),
    ("1-5", 1.0, 5.0),
    ("sigma>5", 5.0, 80.0),
)
#: `models.edm.PRESETS`' names, here without torch for the panel's pick-list (a test checks they agree).
PRESET_NAMES = ("cpu-small", "paper")
CLIP_NORM = 1.0
PREVIEW_SEED = 20260  # fixed: every preview starts from the same noise
VALIDATION_SEED = 7  # fixed: every validation uses the same sigmas and noise


@dataclass
class DiffBulkStage1Config:
    """Everything one stage-1 run needs; readable from TOML or JSON (`from_file`) without torch."""

    slides: list[dict]  # each {"path": ..., "section": ... (optional), "name": ... (optional)}
    out: str  # the run's folder: checkpoint/, latents/, previews/
    validation: list[str] = field(default_factory=list)  # slide names held out (validation loss, preview)
    protocol: str = "hist2st"
    tile_um: float = 112.0  # tile side in µm (centred on each spot)
    preset: str = "cpu-small"  # `models.edm.PRESETS`
    edm: dict = field(default_factory=dict)  # EDMConfig fields changed from the preset
    gene_encoder: dict = field(default_factory=dict)  # GeneEncoderConfig fields (dim, heads, layers, ...)
    taef2: str = ""  # folder with taef2_encoder.pth / taef2_decoder.pth; "" = pixel space for TAEF2 presets
    pixel_fallback: int = 64  # tile side in pixels when a TAEF2 preset runs without TAEF2
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 100  # steps of linear learning-rate warm-up
    p_drop: float = 0.5  # probability a sample's condition is dropped (per sample)
    panel_fraction_min: float = 0.5  # each kept sample conditions on this fraction of the panel or more
    panel_fraction_max: float = 1.0
    max_condition_genes: int = 0  # cap on a sample's condition genes (0: none)
    max_tiles: int = 0  # at most this many tiles per slide, drawn with the seed (0: all)
    augment: int = 1  # dihedral variants encoded per tile (1: none, 8: all flips and rotations)
    validation_tiles: int = 32  # tiles the validation loss uses (evenly spaced; ~6 s per check at cpu-small)
    eval_every: int = 100
    preview_every: int = 500  # 0: no previews
    preview_n: int = 4
    preview_steps: int = 12
    guidance: float = 2.0
    preview_spot: str = ""  # "SPOT" or "SLIDE:SPOT"; default the first validation tile
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    resume: str | None = None  # a run folder (or its checkpoint/) to continue

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> DiffBulkStage1Config:
        check_fields(cls, data, source)
        for f in fields(cls):
            if f.name in data:
                _check_type(f.name, str(f.type), data[f.name], source)
        config = cls(**data)
        config.check(source)
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DiffBulkStage1Config:
        path = Path(path)
        config = cls.from_dict(read_config_file(path), source=str(path))
        return resolve_paths(config, path.parent, extra=("taef2",))

    def check(self, source: str = "config") -> None:
        def refuse(name: str, expected: str) -> GenemapInputError:
            return GenemapInputError(f"{source}: field {name!r} is {getattr(self, name)!r}; expected {expected}")

        if not self.slides or not all(isinstance(s, dict) and "path" in s for s in self.slides):
            raise GenemapInputError(f"{source}: field 'slides' must list tables with a 'path'")
        for name in ("steps", "batch_size", "eval_every", "preview_n", "preview_steps", "pixel_fallback"):
            if getattr(self, name) < 1:
                raise refuse(name, "a positive whole number")
        for name in ("warmup", "max_condition_genes", "max_tiles", "preview_every", "seed", "threads"):
            if getattr(self, name) < 0:
                raise refuse(name, "a whole number, 0 or more")
        if self.validation_tiles < 1:
            raise refuse("validation_tiles", "a positive whole number")
        if not 1 <= self.augment <= 8:
            raise refuse("augment", "1 to 8 dihedral variants per tile")
        if self.pixel_fallback % 8:
            raise refuse("pixel_fallback", "a multiple of 8 pixels")
        for name in ("tile_um", "lr"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise refuse(name, "a positive number")
        for name in ("weight_decay", "guidance"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise refuse(name, "a number, 0 or more")
        for name in ("p_drop", "panel_fraction_min", "panel_fraction_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise refuse(name, "a fraction in [0, 1]")
        if self.panel_fraction_min == 0.0:
            raise refuse("panel_fraction_min", "a fraction above 0 (a kept condition holds at least one gene)")
        if self.panel_fraction_min > self.panel_fraction_max:
            raise refuse("panel_fraction_min", f"at most panel_fraction_max ({self.panel_fraction_max})")
        names = [slide_name(s) for s in self.slides]
        for name in self.validation:
            if name not in names:
                raise GenemapInputError(f"{source}: field 'validation' names {name!r}, not among the slides {names}")
        if set(names) <= set(self.validation):
            raise GenemapInputError(f"{source}: field 'validation' holds out every slide; nothing is left to train on")
        try:
            check_device_name(self.device, "device")
        except GenemapInputError as error:
            raise GenemapInputError(f"{source}: field 'device': {error}") from None
        from ..data.protocols import PROTOCOLS

        if self.protocol not in PROTOCOLS:
            raise refuse("protocol", f"one of {', '.join(PROTOCOLS)}")
        if self.edm or self.gene_encoder or self.preset:
            self.model_configs(source)  # imports torch: only the run's process reads a config file

    def model_configs(self, source: str = "config"):
        """The EDM and gene-encoder configs and the latent space this config asks for (a new run's)."""
        from ..models.diffbulk import latent_space
        from ..models.edm import PRESETS, preset
        from ..models.gene_encoder import GeneEncoderConfig

        if self.preset not in PRESETS:
            raise GenemapInputError(
                f"{source}: field 'preset' is {self.preset!r}; expected one of {', '.join(PRESETS)}"
            )
        try:
            edm = preset(self.preset, **self.edm)
        except (GenemapInputError, TypeError, ValueError) as error:
            raise GenemapInputError(f"{source}: field 'edm': {error}") from None
        try:
            genes = GeneEncoderConfig(**{k: v for k, v in self.gene_encoder.items() if k != "genes"})
        except (GenemapInputError, TypeError, ValueError) as error:
            raise GenemapInputError(f"{source}: field 'gene_encoder': {error}") from None
        if edm.space == "taef2" and not self.taef2:
            edm = replace(edm, space="pixel", in_channels=3, sample_size=self.pixel_fallback)
        if edm.space == "taef2" and edm.in_channels != 32:
            raise GenemapInputError(f"{source}: field 'edm': TAEF2 latents have 32 channels, not {edm.in_channels}")
        try:
            edm = replace(edm, condition_dim=genes.dim, p_drop=self.p_drop)
        except GenemapInputError as error:
            raise GenemapInputError(f"{source}: field 'edm': {error}") from None
        return edm, genes, latent_space(edm.space)


_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "a whole number"),
    "float": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "dict": ((dict,), "a table"),
    "list[dict]": ((list,), "a list of tables"),
    "list[str]": ((list,), "a list of names"),
    "str | None": ((str, type(None)), "a path"),
}


def _check_type(name: str, declared: str, value: Any, source: str) -> None:
    kinds, expected = _TYPES[declared]
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok and declared == "list[str]":
        ok = all(isinstance(v, str) for v in value)
    if ok and declared == "float":
        ok = math.isfinite(value)
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise GenemapInputError(f"{source}: field {name!r} is {shown}; expected {expected}")


# --- data ---------------------------------------------------------------------------------------------


class Cancelled(Exception):
    """Cancelled before training began (while tiles were being encoded)."""


@dataclass
class TileSet:
    """One slide's training pairs: stored latents (float16) and the protocol's values of each tile."""

    name: str
    latents: np.ndarray  # (tiles, variants, C, h, w) float16: TAEF2 latents (z / 6 + 0.5) or RGB in [0, 1]
    values: np.ndarray  # (tiles, genes) float32
    spots: list[str]


def load_tile_sets(
    config: DiffBulkStage1Config,
    protocol: Protocol | None,
    space: LatentSpace,
    tile_px: int,
    encode: Callable[[np.ndarray], np.ndarray],
    encoder_digest: str,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[dict[str, TileSet], Protocol, dict]:
    """Every slide's tiles, encoded once (``<out>/latents``); the protocol's genes come from training slides
    when the protocol selects them. Returns the sets, the protocol and counts of tiles encoded and cached.
    ``cancel`` is asked between batches of tiles: `Cancelled` leaves no partial cache file."""
    from ..data.latents import cache_key, cache_path, cached_latents, dihedral, encode_tiles, file_identity
    from ..data.protocols import get_protocol
    from ..data.pseudobulk import normalise_tiles, read_tiles, spot_tiles
    from ..io import counts_table, read_slide

    sdatas = {slide_name(s): (s, read_slide(s["path"], section=s.get("section"))) for s in config.slides}
    if protocol is None:
        training = [counts_table(sd) for name, (_, sd) in sdatas.items() if name not in config.validation]
        protocol = get_protocol(config.protocol, training)
    mpp = config.tile_um / tile_px
    cache = Path(config.out) / "latents"
    sets, counts = {}, {"encoded_tiles": 0, "cached_slides": 0}
    for name, (spec, sdata) in sdatas.items():
        tiles = spot_tiles(sdata, config.tile_um)
        if config.max_tiles and tiles.n_obs > config.max_tiles:
            chosen = np.random.default_rng(config.seed).choice(tiles.n_obs, config.max_tiles, replace=False)
            tiles = tiles[np.sort(chosen)].copy()
        normalised = normalise_tiles(tiles, protocol)
        key = cache_key(
            {
                "image": file_identity(tiles.uns["pseudobulk"]["source"]),
                "slide": os.path.abspath(spec["path"]),
                "section": spec.get("section"),
                "boxes": tiles.obs[["x0", "y0", "x1", "y1"]].to_numpy(np.float64),
                "tile_px": tile_px,
                "mpp": mpp,
                "space": space.space,
                "encoder": encoder_digest,
                "variants": config.augment,
                "cache_format": 1,  # raise when reading or encoding tiles changes
            }
        )

        def make(sdata=sdata, tiles=tiles, name=name) -> np.ndarray:
            logger.info("%s: reading and encoding %d tiles (%d variants)", name, tiles.n_obs, config.augment)
            images = dihedral(read_tiles(sdata, tiles, mpp), config.augment)

            def step(done: int, total: int, text: str) -> None:
                if cancel is not None and cancel():
                    raise Cancelled(f"cancelled while encoding {name}'s tiles")
                if progress is not None:
                    progress(0, config.steps, f"{text} {done}/{total}")

            return encode_tiles(images, encode, progress=step, label=f"{name}: encoding tiles")

        latents, made = cached_latents(cache_path(cache, name, key), make)
        if made:
            counts["encoded_tiles"] += tiles.n_obs * config.augment
        else:
            counts["cached_slides"] += 1
        sets[name] = TileSet(name, latents, normalised.layers["protocol"].astype(np.float32), list(tiles.obs["spot"]))
    return sets, protocol, counts


def _encoder(config: DiffBulkStage1Config, space: LatentSpace, device):
    """The TAEF2 pair (None in pixel space), the encode function for the cache and the weights' digest."""
    import hashlib

    import torch

    if space.space == "pixel":

        def keep_rgb(images: np.ndarray) -> np.ndarray:
            return images.transpose(0, 3, 1, 2).astype(np.float32) / 255

        return None, keep_rgb, "pixel"
    from ..models.taef2 import FILES, TAEF2

    if not config.taef2:
        raise GenemapInputError("this run works in TAEF2 latents: set 'taef2' to the folder holding its weights")
    folder = Path(config.taef2)
    if not folder.is_dir():
        raise GenemapInputError(f"{folder}: no such TAEF2 weights folder (field 'taef2')")
    taef2 = TAEF2.from_folder(folder).to(device)
    digest = hashlib.sha256(b"".join((folder / name).read_bytes() for name in FILES.values())).hexdigest()

    @torch.no_grad()
    def encode(images: np.ndarray) -> np.ndarray:
        rgb = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255
        return taef2.encode(rgb).cpu().numpy()

    return taef2, encode, digest


# --- the run --------------------------------------------------------------------------------------------


def train_diffbulk_stage1(
    config: DiffBulkStage1Config,
    *,
    progress: Progress | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Train stage 1 (see the module's docstring); returns a summary: checkpoint, steps, cancelled, seconds,
    history (the metric records), preview (the last grid's path), latents (tiles encoded, slides cached)."""
    import torch

    from ..device import resolve_device
    from ..models.diffbulk import CHECKPOINT_DIR, DiffBulkStage1, checkpoint_folder, load_stage1, read_training_state

    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    ranks = distributed.start(device, config.batch_size)  # torchrun: this process's rank; else a no-op
    device = distributed.device_for(device, ranks)
    if not ranks.main:  # rank 0 reports and writes; the others only compute their shards
        progress = on_metrics = None
    out = Path(config.out)
    target = out / CHECKPOINT_DIR
    resumed = None
    if config.resume:
        resumed = load_stage1(config.resume, device)
        tensors, state = read_training_state(resumed.path)
        start = int(state["step"])
        _check_resumable(config, resumed.config, start, resumed.path)
        if target.exists() and checkpoint_folder(target).resolve() != resumed.path.resolve():
            raise GenemapInputError(f"{out}: holds another checkpoint already; choose another output folder")
        model: DiffBulkStage1 = resumed.model
        model.train()
        from ..data.protocols import Protocol

        protocol: Protocol | None = Protocol.from_dict(resumed.config["protocol"])
    else:
        if (target / "config.json").exists():
            raise GenemapInputError(f"{out}: holds a checkpoint already; resume it, or choose another output folder")
        start, tensors, state = 0, {}, {}
        edm_config, gene_config, space = config.model_configs()
        torch.manual_seed(config.seed)
        model = DiffBulkStage1(edm_config, gene_config, space).to(device)
        protocol = None
    space = model.latent
    taef2, encode, digest = _encoder(config, space, device)
    loaded = None
    if ranks.main:  # rank 0 encodes and caches the tiles; the others then read its cache
        try:
            loaded = load_tile_sets(config, protocol, space, model.tile_px, encode, digest, progress, cancel)
        except Cancelled as stop:
            logger.info("%s", stop)
    main_cancelled = ranks.any(ranks.main and loaded is None)  # also the point where the others wait for rank 0
    if loaded is None and not main_cancelled:  # the other ranks, from rank 0's cache
        loaded = load_tile_sets(config, protocol, space, model.tile_px, encode, digest)
    if loaded is None:
        distributed.stop(ranks)
        checkpoint = str(resumed.path) if resumed else None
        return {
            "checkpoint": checkpoint,
            "best_validation": None,
            "validation_loss": None,
            "steps": 0,
            "cancelled": True,
            "seconds": time.perf_counter() - started,
            "history": [],
            "preview": None,
            "latents": {},
        }
    sets, protocol, cache_counts = loaded
    train_sets = [s for name, s in sets.items() if name not in config.validation]
    valid_sets = [sets[name] for name in config.validation]
    if not train_sets:
        raise GenemapInputError("every slide is a validation slide; nothing is left to train on")
    if resumed is None:
        model.gene_encoder.add_genes(protocol.genes)  # before the optimiser: growing replaces the parameter
    rows = model.gene_encoder.gene_ids(protocol.genes).numpy()  # the panel's rows in the encoder
    train_latents = np.concatenate([s.latents for s in train_sets])
    train_values = np.concatenate([s.values for s in train_sets])
    check_set = _validation_set(valid_sets or train_sets, config.validation_tiles)
    preview = _preview_tile(config, valid_sets or train_sets)

    from ..models.diffbulk import Stage1Objective

    objective: torch.nn.Module = Stage1Objective(model)
    if ranks.active:  # gradients averaged over the ranks in backward; the draws are the same everywhere
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # unused parameters: a shard without kept samples never runs the gene encoder
        objective = DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if resumed is not None:
        restore_optimiser(optimiser, generator, rng, tensors, state)
    provenance = {
        "training": [dict(s) for s in config.slides if slide_name(s) not in config.validation],
        "validation": list(config.validation),
        "tiles": {s.name: len(s.spots) for s in sets.values()},
        "taef2": {"folder": config.taef2, "sha256": digest} if space.space == "taef2" else None,
        "config": asdict(config),
    }
    tile = {"tile_um": config.tile_um, "tile_px": model.tile_px, "mpp": config.tile_um / model.tile_px}
    logger.info(
        "stage 1: %d step(s) from step %d on %s; %d training tiles (%s), %d validation tiles; %s space %s",
        config.steps - start,
        start,
        device,
        len(train_latents),
        ", ".join(s.name for s in train_sets),
        len(check_set[0]),
        space.space,
        tuple(train_latents.shape[2:]),
    )
    history: list[dict] = []
    cancelled, saved, running = False, resumed is not None, state.get("running")
    last_preview, bands = None, None
    loop_started = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        if ranks.any(cancel is not None and cancel()):  # every rank stops at the same step
            cancelled = True
            break
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = config.lr * min(1.0, step / config.warmup) if config.warmup else config.lr
        draws = _draw(config, train_latents, train_values, rows, rng, generator, device, model.edm_config)
        loss, weighted_mse = objective(*_shard_inputs(draws, ranks.shard(config.batch_size), device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the ranks' gradients here: the global batch's
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimiser.step()
        mse = ranks.mean(float(weighted_mse.mean()))
        objective_value = ranks.mean(float(loss.detach()))
        running = mse if running is None else 0.95 * running + 0.05 * mse
        done = step - start
        per_step = (time.perf_counter() - loop_started) / done
        if progress is not None:
            eta = duration(per_step * (config.steps - step))
            progress(step, config.steps, f"loss {running:.4f}; {per_step:.2f} s/step; ETA {eta}")
        record: dict[str, Any] = {
            "step": step,
            "loss": mse,  # EDM's lambda-weighted MSE: comparable with the validation bands
            "objective": objective_value,  # what is minimised: with EDM2's uncertainty, may be negative
            "lr": optimiser.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        last = step == config.steps
        if ranks.main and (step % config.eval_every == 0 or last):
            timer = time.perf_counter()
            bands, unconditioned = _validation_bands(model, check_set, rows, config.batch_size, device)
            record["validation_loss"] = bands
            record["validation_loss_unconditioned"] = unconditioned
            record["validation_on"] = "validation slides" if valid_sets else "training tiles"
            metrics = {"step": step, "loss": running, "validation_loss": bands}
            metrics["validation_loss_unconditioned"] = unconditioned
            values = {"step": step, "running": running, "numpy_rng": rng.bit_generator.state}
            values.update(optimiser_groups(optimiser))
            save_stage1_state = (optimiser_state_tensors(optimiser, generator), values)
            from ..models.diffbulk import save_stage1

            save_stage1(
                target,
                model,
                protocol=protocol.to_dict(),
                tile=tile,
                provenance=provenance,
                metrics=metrics,
                training_state=save_stage1_state,
            )
            record["saved"] = saved = True
            record["eval_seconds"] = time.perf_counter() - timer  # validation and saving
            logger.info("step %d: validation loss %s; saved %s", step, _bands_text(bands), target)
        if ranks.main and config.preview_every and (step % config.preview_every == 0 or last):
            timer = time.perf_counter()
            last_preview = _write_preview(model, taef2, preview, rows, config, out / "previews", step, device)
            record["preview"] = str(last_preview)
            record["preview_seconds"] = time.perf_counter() - timer
        history.append(record)
        if on_metrics is not None:
            on_metrics(record)
    distributed.stop(ranks)
    return {
        "checkpoint": str(target) if saved and target.exists() else (str(resumed.path) if resumed else None),
        "best_validation": None,  # stage 1 keeps the latest checkpoint: a diffusion loss does not rank samples
        "validation_loss": bands,
        "steps": len(history),
        "cancelled": cancelled,
        "seconds": time.perf_counter() - started,
        "history": history,
        "preview": str(last_preview) if last_preview else None,
        "latents": cache_counts,
    }


def _check_resumable(config: DiffBulkStage1Config, saved: dict, step: int, path: Path) -> None:
    if step >= config.steps:
        raise GenemapInputError(f"{path}: checkpoint is at step {step} of {config.steps}; raise 'steps' to train on")
    tile_um = saved.get("tile", {}).get("tile_um")
    if tile_um is not None and not math.isclose(tile_um, config.tile_um, rel_tol=1e-9):
        raise GenemapInputError(
            f"{path}: checkpoint was trained on {tile_um} µm tiles; the config asks {config.tile_um}"
        )
    if saved["latent"]["space"] == "taef2" and not config.taef2:
        raise GenemapInputError(f"{path}: checkpoint works in TAEF2 latents; set 'taef2' to the weights folder")


@dataclass
class Draws:
    """One step's random choices for the whole (global) batch, drawn before any rank computes its shard."""

    stored: np.ndarray  # (batch, C, h, w) the chosen tiles' stored latents
    keep: np.ndarray  # (batch,) bool: the masking switch
    sigma: Any  # (batch,) torch tensor: noise levels
    noise: Any  # (batch, C, h, w) torch tensor: unit noise
    panels: tuple[np.ndarray, ...]  # kept samples' gene subsets (values, rows, padding), in batch order


def _draw(config, latents, values, rows, rng, generator, device, edm) -> Draws:
    """Every random choice of one step, for the whole batch, from the run's two generators."""
    import torch

    from ..models.edm import keep_condition, sample_sigma

    batch = config.batch_size
    index = rng.integers(0, len(latents), size=batch)
    variant = rng.integers(0, latents.shape[1], size=batch)
    keep = keep_condition(batch, config.p_drop, generator, device).cpu().numpy()
    panels = _subsets(values[index[keep]], rows, config, rng) if keep.any() else ()
    sigma = sample_sigma(batch, edm.p_mean, edm.p_std, generator, device)
    noise = torch.randn((batch, edm.in_channels, edm.sample_size, edm.sample_size), generator=generator, device=device)
    return Draws(latents[index, variant].astype(np.float32), keep, sigma, noise, panels)


def _shard_inputs(draws: Draws, part: slice, device) -> tuple:
    """This rank's share of the drawn batch, as the tensors `models.diffbulk.Stage1Objective` takes."""
    import torch

    keep = draws.keep[part]
    first = int(draws.keep[: part.start].sum())  # kept samples before the shard: where its panels start
    panels = tuple(torch.from_numpy(a[first : first + int(keep.sum())]).to(device) for a in draws.panels)
    return (
        torch.tensor(draws.stored[part], device=device),
        torch.from_numpy(keep).to(device),
        draws.sigma[part],
        draws.noise[part],
        panels,
    )


def _subsets(values: np.ndarray, rows: np.ndarray, config: DiffBulkStage1Config, rng) -> tuple[np.ndarray, ...]:
    """Each sample's random gene subset: padded values, encoder rows and padding mask (True = padding)."""
    n_genes = values.shape[1]
    low = max(1, math.ceil(config.panel_fraction_min * n_genes))
    high = max(low, math.ceil(config.panel_fraction_max * n_genes))
    sizes = rng.integers(low, high + 1, size=len(values))
    if config.max_condition_genes:
        sizes = np.minimum(sizes, config.max_condition_genes)
    width = int(sizes.max())
    out_values = np.zeros((len(values), width), np.float32)
    out_rows = np.zeros((len(values), width), np.int64)
    padding = np.ones((len(values), width), bool)
    for i, size in enumerate(sizes):
        chosen = rng.choice(n_genes, size=int(size), replace=False)
        out_values[i, :size] = values[i, chosen]
        out_rows[i, :size] = rows[chosen]
        padding[i, :size] = False
    return out_values, out_rows, padding


def _validation_set(sets: list[TileSet], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` tiles, evenly spaced over the sets (identity variant): latents and values."""
    latents = np.concatenate([s.latents[:, 0] for s in sets])
    values = np.concatenate([s.values for s in sets])
    if len(latents) > limit:
        chosen = np.unique(np.linspace(0, len(latents) - 1, limit).round().astype(int))
        latents, values = latents[chosen], values[chosen]
    return latents, values


def _validation_bands(model, check_set, rows, batch: int, device) -> tuple[dict[str, float], dict[str, float]]:
    """Mean lambda-weighted MSE per noise band, conditioned on the whole panel and unconditioned; the same
    sigmas and noise at every call (`VALIDATION_SEED`)."""
    import torch

    from ..models.edm import edm_loss

    latents, values = check_set
    model.eval()
    panel = torch.as_tensor(rows)
    sums = {(name, kind): 0.0 for name, _, _ in BANDS for kind in ("cond", "uncond")}
    sigma_generator = np.random.default_rng(VALIDATION_SEED)
    with torch.no_grad():
        for start in range(0, len(latents), batch):
            stored = torch.from_numpy(latents[start : start + batch].astype(np.float32)).to(device)
            x = model.latent.to_diffusion(stored)
            chunk = torch.from_numpy(values[start : start + batch]).to(device)
            condition = model.gene_encoder(chunk, panel.expand(len(chunk), -1).to(device))
            for b, (name, low, high) in enumerate(BANDS):
                sigma = np.exp(sigma_generator.uniform(math.log(low), math.log(high), size=len(x)))
                sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=device)
                for kind, cond in (("cond", condition), ("uncond", None)):
                    noise = torch.Generator(device=device).manual_seed(VALIDATION_SEED * 1000 + start * 10 + b)
                    result = edm_loss(
                        model.denoiser, x, cond, sigma=sigma_t, p_drop=0.0, generator=noise, uncertainty=False
                    )
                    sums[name, kind] += float(result.weighted_mse.sum())
    n = len(latents)
    return (
        {name: sums[name, "cond"] / n for name, _, _ in BANDS},
        {name: sums[name, "uncond"] / n for name, _, _ in BANDS},
    )


def _preview_tile(config: DiffBulkStage1Config, sets: list[TileSet]) -> tuple[str, np.ndarray, np.ndarray]:
    """The spot whose profile the previews draw: (label, stored latent (C, h, w), values)."""
    wanted = config.preview_spot
    for tile_set in sets:
        for i, spot in enumerate(tile_set.spots):
            if not wanted or wanted in (spot, f"{tile_set.name}:{spot}"):
                return f"{tile_set.name}:{spot}", tile_set.latents[i, 0], tile_set.values[i]
    where = "validation" if config.validation else "training"
    raise GenemapInputError(f"field 'preview_spot': {wanted!r} is not among the {where} tiles")


def _write_preview(model, taef2, preview, rows, config, folder: Path, step: int, device) -> Path:
    """The grid: row 1 the spot's own tile then generated for its profile, row 2 unconditioned; atomic PNG."""
    import torch
    from PIL import Image

    from ..io.atomic import atomic_file
    from ..models.generate import draw, tile_grid, to_rgb

    label, stored, values = preview
    decode = taef2.decode if taef2 is not None else (lambda tiles: tiles.clamp(0, 1))
    with torch.no_grad():
        values_row, rows_row = torch.from_numpy(values[None]).to(device), torch.as_tensor(rows[None]).to(device)
        condition = model.gene_encoder(values_row, rows_row)
    drawn, free = draw(
        model,
        decode,
        condition,
        config.preview_n,
        steps=config.preview_steps,
        guidance=config.guidance,
        seed=PREVIEW_SEED,
        device=device,
    )
    real = to_rgb(torch.from_numpy(stored[None].astype(np.float32)).to(device), decode)
    grid = tile_grid([real[0], *drawn], list(free), offset=1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.png"
    with atomic_file(path) as temporary:
        Image.fromarray(grid).save(temporary, format="PNG", pnginfo=_png_text(label, step, config))
    return path


def _png_text(label: str, step: int, config: DiffBulkStage1Config):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(
        "napari-genemap",
        f"DiffBulk stage 1, step {step}; top: {label} (its tile, then drawn for its profile, guidance "
        f"{config.guidance:g}, Heun {config.preview_steps} steps); bottom: unconditioned, same noise",
    )
    return info


def _bands_text(bands: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in bands.items())
