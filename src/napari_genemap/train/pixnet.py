"""Train PixNet on slides with measured spots; select the checkpoint on held-out validation sections.

``genemap train pixnet --config run.toml`` calls `train_pixnet`. Validation sections are never trained on;
the saved checkpoint is the one with the best validation mean Pearson (the protocol's genes, per section,
undefined genes omitted), or the latest one (saved every ``eval_every`` steps, so a cancelled run keeps one)
when no validation section is named. A test section belongs to neither list: pass it only to the evaluation.
``resume`` continues a run from its checkpoint (see `train_pixnet`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import cast

import numpy as np
import torch

from ..data.protocols import Protocol, get_protocol
from ..data.stain import StainBasis
from ..data.windows import TrainingSlide, load_training_slide
from ..device import resolve_device
from ..errors import GenemapInputError
from ..evaluate.metrics import summarise_unit
from ..models.aggregation import aggregate_disks
from ..models.checkpoint import save_checkpoint
from ..models.encoders import EncoderConfig
from ..models.pixnet import PixNet, PixNetConfig
from ..models.predict import predict_spots
from .config import TrainConfig, slide_name
from .losses import RawTerm, spot_loss
from .sampler import WindowSampler
from .schedule import warmup_cosine

Progress = Callable[[int, int, str], None]
logger = logging.getLogger(__name__)


def load_slides(config: TrainConfig, protocol: Protocol | None = None) -> tuple[dict[str, TrainingSlide], Protocol]:
    """Read every slide of the config at the model's µm/px; the protocol's genes come from training slides."""
    from ..io import counts_table, read_slide

    sdatas = {slide_name(s): read_slide(s["path"], section=s.get("section")) for s in config.slides}
    missing = [name for name in config.validation if name not in sdatas]
    if missing:
        raise GenemapInputError(f"validation slide {missing[0]!r} is not among the slides {sorted(sdatas)}")
    if protocol is None:
        training = [counts_table(s) for name, s in sdatas.items() if name not in config.validation]
        protocol = get_protocol(config.protocol, training)
    return {name: load_training_slide(s, protocol, config.mpp, name) for name, s in sdatas.items()}, protocol


def evaluate_slides(
    model: torch.nn.Module, slides: list[TrainingSlide], protocol: Protocol, window: int
) -> dict[str, float]:
    """Mean Pearson per slide (protocol values, undefined genes omitted) from spot-centred windows."""
    scores = {}
    for slide in slides:
        raw = predict_spots(model, slide.image, slide.centers, slide.radii, window)
        scores[slide.name] = float(summarise_unit(protocol.normalise(raw), slide.targets)["PCC@M"])
    return scores


def mean_density(slides: list[TrainingSlide], stride: int) -> torch.Tensor:
    """Mean counts per output pixel of each gene over the training spots (the head's starting point)."""
    raw = np.concatenate([s.raw for s in slides])
    area = np.concatenate([np.pi * (s.radii / stride) ** 2 for s in slides])
    return torch.as_tensor(raw.sum(0) / area.sum(), dtype=torch.float32)


def gene_basis(config: TrainConfig, train_slides: list[TrainingSlide], protocol: Protocol) -> np.ndarray:
    """A low-rank head's starting components: the PCA of the counts of ``config.gene_basis`` (tables without
    images allowed), else of the training slides' spots; never of a validation slide's."""
    from ..data.gene_basis import gene_components
    from ..io import read_counts

    if config.gene_basis:
        tables = [protocol.counts(read_counts(path)) for path in config.gene_basis]
    else:
        tables = [slide.raw for slide in train_slides]
    return gene_components(tables, config.gene_rank)


def normalise_stains(
    slides: dict[str, TrainingSlide], validation: list[str], stain: StainBasis | None = None
) -> tuple[dict[str, TrainingSlide], StainBasis]:
    """Every slide re-stained (Macenko) with ``stain``, by default the training slides' pooled stains (never
    a validation slide's); new slides, the given ones are left as they are (a benchmark reuses them)."""
    from ..data.stain import apply_od_matrix, named_stains, normalising_matrix

    if stain is None:
        training = {name: s for name, s in slides.items() if name not in validation}
        stain = named_stains({name: s.image for name, s in training.items()}, next(iter(training.values())).mpp)
    normalised = {}
    for name, slide in slides.items():
        matrix = normalising_matrix(named_stains({name: slide.image}, slide.mpp), stain)
        normalised[name] = replace(slide, image=apply_od_matrix(slide.image, matrix))
    return normalised, stain


def make_optimiser(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the pretrained part (``model.encoder``: PixNet's encoder, or what a model calls its own)
    ``encoder_lr_factor`` slower than the rest; the decoder's group is second (its rate is the one reported)."""
    pretrained = cast(torch.nn.Module, model.encoder)
    encoder_params = [p for p in pretrained.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in encoder_params}
    decoder_params = [p for p in model.parameters() if id(p) not in encoder_ids and p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": encoder_params, "lr": config.lr * config.encoder_lr_factor},
            {"params": decoder_params, "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )


def run_provenance(config: TrainConfig) -> dict:
    """What a checkpoint records of its run: training and validation slides, and the whole config."""
    return {
        "training": [dict(s) for s in config.slides if slide_name(s) not in config.validation],
        "validation": list(config.validation),
        "config": asdict(config),
    }


def train_pixnet(
    config: TrainConfig,
    *,
    slides: dict[str, TrainingSlide] | None = None,
    protocol: Protocol | None = None,
    progress: Progress | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    model: torch.nn.Module | None = None,
) -> dict:
    """Train, validate every ``eval_every`` steps, keep the best checkpoint; returns a summary.

    ``model``: a gene-map model to train in place of a new PixNet (DiffBulk's stage 2 builds its own); its
    ``encoder`` is the pretrained part that moves ``encoder_lr_factor`` slower, and parameters that do not
    require gradients (a frozen part) are left out of the optimiser.

    ``slides`` and ``protocol`` may be given pre-loaded together (the benchmark reuses them across folds).
    Cancelling stops after the current step; the checkpoint on disk is then the best one so far.

    With ``config.resume`` the run starts from that checkpoint's weights, architecture, genes and protocol
    (the config's encoder, weights and stride are then ignored) and continues its step count
    (``metrics["step"]``) up to ``config.steps``, on the same learning-rate schedule. The optimiser's state
    (AdamW moments) is not saved in checkpoints, so it starts afresh: a resumed run is close to, not
    identical with, one that never stopped. Its best score starts at the checkpoint's own validation score
    when the validation slides are the same, so the resumed run only overwrites it with a better model.
    """
    resumed = _resume_point(config, protocol) if config.resume else None
    start = resumed[1] if resumed else 0
    torch.manual_seed(config.seed + start)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if resumed is not None and protocol is None:
        protocol = resumed[0].protocol
    if slides is None:
        slides, protocol = load_slides(config, protocol)
    elif protocol is None:
        raise GenemapInputError("pre-loaded slides need the protocol their targets were normalised with")
    if not [name for name in slides if name not in config.validation]:
        raise GenemapInputError("every slide is a validation slide; nothing is left to train on")
    stain = resumed[0].stain if resumed is not None else None  # a resumed run keeps its reference stains
    if config.stain_normalise or stain is not None:
        slides, stain = normalise_stains(slides, config.validation, stain)
    train_slides = [s for name, s in slides.items() if name not in config.validation]
    valid_slides = [slides[name] for name in config.validation]
    if resumed is not None:
        model = resumed[0].model.to(device)
    elif model is not None:
        model = model.to(device)
    else:
        model_config = PixNetConfig(
            n_genes=protocol.n_genes,
            encoder=EncoderConfig(config.encoder, config.weights),
            stride=config.stride,
            gene_rank=config.gene_rank,
        )
        model = PixNet(model_config)
        model.set_output_scale(mean_density(train_slides, config.stride))
        if config.gene_rank:
            model.set_gene_components(torch.from_numpy(gene_basis(config, train_slides, protocol)))
        model = model.to(device)
    # channels-last convolutions: the same numbers, about a tenth less time per step on a CPU (oneDNN)
    model = model.to(memory_format=torch.channels_last)
    raw_term = RawTerm(config.raw_loss, protocol.n_genes).to(device)
    optimiser = make_optimiser(model, config)
    if list(raw_term.parameters()):  # the negative binomial's dispersions learn at the decoder's rate
        optimiser.add_param_group({"params": list(raw_term.parameters()), "lr": config.lr})
    schedule = warmup_cosine(optimiser, config.steps)
    if start:
        _continue_schedule(schedule, start)
    sampler = WindowSampler(train_slides, config.window, seed=config.seed + start, stain=config.stain_jitter)
    provenance = run_provenance(config)
    save_dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    best, history, started = -math.inf, [], time.perf_counter()
    logger.info(
        "training %d step(s) from step %d on %s: %s; validation %s",
        config.steps - start,
        start,
        device,
        ", ".join(s.name for s in train_slides),
        ", ".join(config.validation) or "none",
    )
    if resumed is not None:
        best = _resumed_score(resumed[0].metrics, config.validation, start)
    cancelled = saved = False
    running = None
    for step in range(start + 1, config.steps + 1):
        if cancel is not None and cancel():
            cancelled = True
            break
        model.train()
        batch = sampler.batch(config.batch)
        images = torch.from_numpy(batch.images).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=config.precision == "bfloat16"):
            density = model(images).float()
        predicted = torch.cat(
            [
                aggregate_disks(density[i], torch.as_tensor(c), torch.as_tensor(r), stride=config.stride)
                for i, (c, r) in enumerate(zip(batch.centers, batch.radii, strict=True))
            ]
        )
        terms = spot_loss(
            predicted,
            torch.from_numpy(batch.raw).to(device),
            torch.from_numpy(batch.targets).to(device),
            protocol,
            config.raw_weight,
            raw_term,
        )
        optimiser.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimiser.step()
        lr = optimiser.param_groups[1]["lr"]  # the decoder's rate this step (the encoder's is a fixed factor)
        schedule.step()
        loss = float(terms["loss"].detach())
        running = loss if running is None else 0.9 * running + 0.1 * loss
        if progress is not None:
            progress(step, config.steps, f"loss {running:.4f}")
        logger.debug("step %d: loss %.4f (running %.4f), lr %.2e", step, loss, running, lr)
        record = {
            "step": step,
            "loss": loss,
            "pearson": float(terms["pearson"].detach()),
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }
        last = step == config.steps
        if step % config.eval_every == 0 or last:
            scores = evaluate_slides(model, valid_slides, protocol, config.window) if valid_slides else {}
            score = float(np.nanmean(list(scores.values()))) if scores else float(step)
            record["validation"] = scores
            if score > best:
                best = score
                save_checkpoint(
                    config.out,
                    model,
                    protocol=protocol,
                    mpp=config.mpp,
                    window=config.window,
                    provenance=provenance,
                    metrics={"step": step, "validation_pcc_mean": scores or None},
                    dtype=save_dtype,
                    stain=stain,
                )
                record["saved"] = saved = True
            saved_note = f"; saved {config.out}" if record.get("saved") else ""
            logger.info("step %d: validation %s%s", step, scores or "none", saved_note)
        history.append(record)
        if on_metrics is not None:
            on_metrics(record)
    return {
        "checkpoint": config.out if saved else config.resume,  # a resumed run that never beat its start
        "best_validation": best if valid_slides and best > -math.inf else None,
        "steps": len(history),
        "cancelled": cancelled,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _resume_point(config: TrainConfig, protocol: Protocol | None):
    """The checkpoint to continue from and its step; a clear error when it cannot be continued."""
    from ..models.checkpoint import load_checkpoint

    assert config.resume is not None  # called only when resuming
    loaded = load_checkpoint(config.resume)
    step = loaded.metrics.get("step")
    if not isinstance(step, int) or step < 0:
        raise GenemapInputError(f"{config.resume}: checkpoint metrics hold no step count; cannot resume it")
    if step >= config.steps:
        raise GenemapInputError(
            f"{config.resume}: checkpoint is at step {step} of {config.steps}; raise 'steps' to train on"
        )
    if not math.isclose(loaded.mpp, config.mpp, rel_tol=1e-6):
        raise GenemapInputError(
            f"{config.resume}: checkpoint works at {loaded.mpp} µm/px; the config asks {config.mpp}"
        )
    if protocol is not None and protocol.genes != loaded.protocol.genes:
        raise GenemapInputError(f"{config.resume}: checkpoint predicts other genes than the given protocol holds")
    return loaded, step


def _continue_schedule(schedule: torch.optim.lr_scheduler.LambdaLR, start: int) -> None:
    """Move a fresh schedule to ``start`` steps done: step ``start + 1`` gets the rate it had in one run."""
    state = schedule.state_dict()
    schedule.load_state_dict({**state, "last_epoch": start, "_step_count": state["_step_count"] + start})
    for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(start)


def _resumed_score(metrics: dict, validation: list[str], step: int) -> float:
    """The resumed checkpoint's score on the scale `train_pixnet` compares (mean PCC, or the step)."""
    scores = metrics.get("validation_pcc_mean") or {}
    if not validation:
        return float(step)
    if sorted(scores) != sorted(validation):
        return -math.inf  # other validation slides: its score says nothing about this run's
    return float(np.nanmean(list(scores.values())))
