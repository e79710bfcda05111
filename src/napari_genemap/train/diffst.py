"""Train Diff-ST (histology-guided super-resolution of measured ST maps) on real LR/HR pairs.

``genemap train diffst --config run.toml`` calls `train_diffst`. Every training slide becomes a pair
(`data.superres.section_pair`: HR = its spots on their array grid, LR = sums of ``factor x factor`` blocks),
with per-cell histology features from the PixNet checkpoint named by ``pathology`` (frozen; copied into
the Diff-ST checkpoint so prediction uses the same weights). Genes: the protocol's (default ``hest``, the 50
most variable genes of the training slides) or the ``genes`` listed (normalised by the protocol's rule).
Maps are standardised per gene with the training spots' statistics; the gene graph's edges come from the
training spots' co-expression. Each step draws ``batch_size`` block-aligned patches of ``patch`` x
``patch`` spots in one of the 8 dihedral views. Every ``eval_every`` steps the validation slides (else the
training slides, and the record says so) are super-resolved (``samples`` draws, ``sample_steps`` Heun steps)
and scored: Pearson of each gene across the measured HR spots, mean over genes; the latest checkpoint is
kept, with what resumes it (the optimiser and random states).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..device import check_device_name
from ..errors import GenemapInputError
from .config import check_fields, read_config_file, resolve_paths, slide_name
from .resume import duration, optimiser_groups, optimiser_state_tensors, restore_optimiser

Progress = Callable[[int, int, str], None]
logger = logging.getLogger(__name__)
CLIP_NORM = 1.0


@dataclass
class DiffSTTrainConfig:
    """One Diff-ST training run; readable from TOML or JSON (`from_file`)."""

    slides: list[dict]  # each {"path": ..., "section": ... (optional), "name": ... (optional)}
    out: str  # run folder; the checkpoint goes in its checkpoint/
    validation: list[str] = field(default_factory=list)
    pathology: str = ""  # a PixNet checkpoint folder: the histology features ("" = no histology)
    protocol: str = "hest"
    genes: list[str] = field(default_factory=list)  # a panel of your own (else the protocol's genes)
    factor: int = 2  # HR spots per LR block along each side
    patch: int = 16  # HR spots per patch side
    width: list[int] = field(default_factory=lambda: [64, 128])
    histology: bool = True
    gene_graph: bool = True
    disentangle: bool = True
    cross_attention: bool = True
    residual: bool = True  # draw each spot's departure from its block's LR value, not the spot's value
    graph_threshold: float = 0.3
    tissue: float = 4.0  # the tissue-scale box, in spot diameters
    min_spots: float = 0.25  # a training patch holds at least this fraction of measured spots
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 1e-4
    charbonnier: float = 1.0
    consistency: float = 0.1
    eval_every: int = 250
    samples: int = 4  # draws per patch at validation
    sample_steps: int = 20
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    resume: str | None = None

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> DiffSTTrainConfig:
        check_fields(cls, data, source)
        config = cls(**data)
        config.check(source)
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DiffSTTrainConfig:
        path = Path(path)
        config = cls.from_dict(read_config_file(path), source=str(path))
        return resolve_paths(config, path.parent, extra=("pathology",))

    def check(self, source: str = "config") -> None:
        if not self.slides or not all(isinstance(s, dict) and "path" in s for s in self.slides):
            raise GenemapInputError(f"{source}: field 'slides' must list tables with a 'path'")
        names = [slide_name(s) for s in self.slides]
        missing = [v for v in self.validation if v not in names]
        if missing:
            raise GenemapInputError(f"{source}: validation slide {missing[0]!r} is not among the slides {names}")
        for name in ("factor", "patch", "steps", "batch_size", "eval_every", "samples", "sample_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise GenemapInputError(
                    f"{source}: field {name!r} is {getattr(self, name)!r}; expected an integer >= 1"
                )
        if self.factor < 2:
            raise GenemapInputError(f"{source}: field 'factor' is {self.factor}; expected 2 or more")
        if self.histology and not self.pathology:
            raise GenemapInputError(
                f"{source}: histology is on but field 'pathology' names no PixNet checkpoint; name one, or set "
                "histology = false"
            )
        if not 0 < self.graph_threshold <= 1:
            raise GenemapInputError(f"{source}: field 'graph_threshold' is {self.graph_threshold}; expected (0, 1]")
        if self.lr <= 0 or self.tissue < 1 or not 0 <= self.min_spots <= 1:
            raise GenemapInputError(f"{source}: lr must be positive, tissue >= 1 and min_spots in [0, 1]")
        check_device_name(self.device, f"{source}: device")

    def model_config(self, genes: int, histology_channels: int):
        from ..models.diffst import DiffSTConfig

        return DiffSTConfig(
            genes=genes,
            factor=self.factor,
            patch=self.patch,
            histology_channels=histology_channels if self.histology else 0,
            width=tuple(self.width),
            histology=self.histology,
            gene_graph=self.gene_graph,
            disentangle=self.disentangle,
            cross_attention=self.cross_attention,
        )


def panel_protocol(config: DiffSTTrainConfig, training_tables: list):
    """The run's protocol: the named one (its genes chosen on the training tables), or its normalisation
    over the listed ``genes``."""
    from ..data.protocols import get_protocol

    if not config.genes:
        return get_protocol(config.protocol, training_tables)
    rule = get_protocol(config.protocol, training_tables)  # its normalisation, with the listed genes
    return replace(rule, name=f"{config.protocol}-panel", genes=tuple(config.genes))


def load_pairs(
    config: DiffSTTrainConfig, protocol=None, pathology=None, device="cpu", progress: Progress | None = None
):
    """Every slide's pair with its histology features; the protocol (chosen on the training slides unless
    given) and the spot diameter the features were averaged over."""
    from ..data.superres import section_pair
    from ..io import counts_table, read_slide
    from ..models.diffst_section import section_histology

    sdatas = {slide_name(s): read_slide(s["path"], section=s.get("section")) for s in config.slides}
    if protocol is None:
        protocol = panel_protocol(config, [counts_table(s) for n, s in sdatas.items() if n not in config.validation])
    pairs, diameters = {}, []
    for index, (name, sdata) in enumerate(sdatas.items()):
        if progress is not None:
            progress(index, len(sdatas), f"reading {name} and its histology features")
        pair = section_pair(sdata, protocol, config.factor, name)
        if pathology is not None:
            features, diameter = section_histology(sdata, pair, pathology, config.tissue, device)
            pair = replace(pair, histology=features)
            diameters.append(diameter)
        pairs[name] = pair
    return pairs, protocol, float(np.median(diameters)) if diameters else None


def standardisation_of(pairs: list, residual: bool = True):
    """Per-gene mean and standard deviation of the training HR targets (spots, or with ``residual`` their
    departures from their blocks' LR values) and of the LR blocks."""
    from ..data.superres import nearest_upsampled
    from ..models.diffst_checkpoint import Standardisation

    def target(pair) -> np.ndarray:
        return pair.hr - nearest_upsampled(pair.lr, pair.factor) if residual else pair.hr

    hr = np.concatenate([target(p)[:, p.hr_mask].T for p in pairs])
    lr = np.concatenate([p.lr[:, p.lr_spots > 0].T for p in pairs])

    def spread(values: np.ndarray) -> np.ndarray:
        return np.maximum(values.std(0), 1e-3)  # a gene constant over training stays finite

    return Standardisation(hr.mean(0), spread(hr), lr.mean(0), spread(lr), residual)


def train_diffst(
    config: DiffSTTrainConfig,
    *,
    progress: Progress | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Train (see the module's docstring); returns a summary: checkpoint, steps, cancelled, seconds, history,
    validation PCC."""
    import torch

    from ..data.superres import cut_patches, dihedral, patch_origins
    from ..device import resolve_device
    from ..models.checkpoint import load_checkpoint
    from ..models.diffst import DiffST, diffst_loss
    from ..models.diffst_checkpoint import CHECKPOINT_DIR, load_diffst, read_training_state, save_diffst
    from ..models.diffst_section import patch_batch
    from ..models.gene_graph import coexpression_graph

    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out = Path(config.out)
    target = out / CHECKPOINT_DIR
    resumed = None
    if config.resume:
        resumed = load_diffst(config.resume, device)
        tensors, state = read_training_state(resumed.path)
        start = int(state["step"])
        if start >= config.steps:
            raise GenemapInputError(f"{resumed.path}: is at step {start} of {config.steps}; raise 'steps' to go on")
        if target.exists() and target.resolve() != resumed.path.resolve():
            raise GenemapInputError(f"{out}: holds another checkpoint already; choose another output folder")
    elif (target / "config.json").exists():
        raise GenemapInputError(f"{out}: holds a checkpoint already; resume it, or choose another output folder")
    pathology_folder = str(resumed.pathology) if resumed and resumed.pathology else config.pathology
    pathology = load_checkpoint(pathology_folder, device) if config.histology and pathology_folder else None
    if pathology is not None and pathology.model_class != "PixNet":
        raise GenemapInputError(f"{pathology_folder}: holds a {pathology.model_class}; expected a PixNet checkpoint")
    pairs, protocol, diameter = load_pairs(config, resumed.protocol if resumed else None, pathology, device, progress)
    if cancel is not None and cancel():
        return _summary(None, [], True, started, None)
    train_pairs = [p for name, p in pairs.items() if name not in config.validation]
    check_pairs = [pairs[name] for name in config.validation] or train_pairs
    if not train_pairs:
        raise GenemapInputError("every slide is a validation slide; nothing is left to train on")
    if resumed is not None:
        standardisation, model = resumed.standardisation, resumed.model.train()
    else:
        standardisation = standardisation_of(train_pairs, config.residual)
        spots = np.concatenate([p.hr[:, p.hr_mask].T for p in train_pairs])
        channels = 0 if pathology is None else len(train_pairs[0].histology)
        torch.manual_seed(config.seed)
        model = DiffST(
            config.model_config(protocol.n_genes, channels), coexpression_graph(spots, config.graph_threshold)
        ).to(device)
    size = config.patch
    patches = [cut_patches(p, patch_origins(p, size, config.min_spots), size) for p in train_pairs]
    square = [p.kind == "square" for p in train_pairs]  # only a square grid keeps its blocks when turned
    pool = [(i, j) for i, part in enumerate(patches) for j in range(len(part.origin))]
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    start, running = (0, None) if resumed is None else (start, state.get("running"))
    if resumed is not None:
        restore_optimiser(optimiser, generator, rng, tensors, state)
    histology = {"diameter_px": diameter, "tissue": config.tissue, "mpp": pathology.mpp if pathology else None}
    provenance = {
        "training": [dict(s) for s in config.slides if slide_name(s) not in config.validation],
        "validation": list(config.validation),
        "patches": len(pool),
        "config": asdict(config),
    }
    logger.info(
        "Diff-ST: %d step(s) from step %d on %s; %d training patches of %d spots (%s); %d genes; %.1f M parameters",
        config.steps - start,
        start,
        device,
        len(pool),
        size,
        ", ".join(p.name for p in train_pairs),
        protocol.n_genes,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    history: list[dict] = []
    cancelled, saved, score = False, resumed is not None, None
    loop_started = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        if cancel is not None and cancel():
            cancelled = True
            break
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = config.lr * min(1.0, step / config.warmup) if config.warmup else config.lr
        batch = _draw(patches, square, pool, config.batch_size, rng, dihedral)
        inputs = patch_batch(batch, standardisation, device, model.config.uses_histology)
        terms = diffst_loss(
            model,
            inputs.hr,
            inputs.hr_mask,
            inputs.conditions,
            charbonnier=config.charbonnier,
            consistency=config.consistency,
            generator=generator,
        )
        optimiser.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimiser.step()
        value = float(terms.diffusion)
        running = value if running is None else 0.95 * running + 0.05 * value
        per_step = (time.perf_counter() - loop_started) / (step - start)
        if progress is not None:
            eta = duration(per_step * (config.steps - step))
            progress(step, config.steps, f"loss {running:.4f}; {per_step:.2f} s/step; ETA {eta}")
        record: dict[str, Any] = {
            "step": step,
            "loss": value,
            "reconstruction": float(terms.reconstruction),
            "consistency": float(terms.consistency),
            "objective": float(terms.loss.detach()),
            "lr": optimiser.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        if step % config.eval_every == 0 or step == config.steps:
            timer = time.perf_counter()
            scores = validation_pcc(model, standardisation, check_pairs, config, device)
            score = float(np.mean(list(scores.values())))
            record["validation"] = scores
            record["validation_on"] = "validation slides" if config.validation else "training slides"
            values = {"step": step, "running": running, "numpy_rng": rng.bit_generator.state}
            values.update(optimiser_groups(optimiser))
            save_diffst(
                target,
                model,
                protocol=protocol,
                standardisation=standardisation,
                histology=histology,
                pathology=pathology_folder if pathology is not None else None,
                provenance=provenance,
                metrics={"step": step, "loss": running, "validation_pcc": score},
                training_state=(optimiser_state_tensors(optimiser, generator), values),
            )
            record["saved"] = saved = True
            record["eval_seconds"] = time.perf_counter() - timer
            logger.info("step %d: validation PCC %.4f; saved %s", step, score, target)
        history.append(record)
        if on_metrics is not None:
            on_metrics(record)
    checkpoint = str(target) if saved and target.exists() else None
    return _summary(checkpoint, history, cancelled, started, score)


def _summary(checkpoint, history, cancelled, started, score) -> dict:
    return {
        "checkpoint": checkpoint,
        "best_validation": score,  # the latest checkpoint is kept; this is its score
        "validation_pcc": score,
        "steps": len(history),
        "cancelled": cancelled,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _draw(patches: list, square: list[bool], pool: list, batch: int, rng: np.random.Generator, dihedral):
    """``batch`` training patches drawn with replacement, each in a random dihedral view (square grids)."""
    from ..data.superres import Patches

    picks = [pool[i] for i in rng.integers(len(pool), size=batch)]
    fields: dict[str, list] = {name: [] for name in ("hr", "hr_mask", "lr", "lr_spots", "centres", "histology")}
    views = []
    for part_index, index in picks:
        part = patches[part_index]
        view = int(rng.integers(8)) if square[part_index] else 0
        views.append(view)
        for name in fields:
            value = getattr(part, name)
            if value is not None:
                spatial = (0, 1) if name == "centres" else (-2, -1)
                fields[name].append(dihedral(value[index], view, spatial))
    stacked: dict[str, Any] = {name: np.stack(values) if values else None for name, values in fields.items()}
    return Patches(**stacked, origin=np.zeros((batch, 2), np.int64), view=np.asarray(views))


def validation_pcc(model, standardisation, pairs: list, config: DiffSTTrainConfig, device) -> dict[str, float]:
    """Per pair, the mean over genes of the Pearson across its measured HR spots (genes without one left
    out), as the benchmark scores one section at a time."""
    from ..evaluate.metrics import pearson_per_gene
    from ..models.diffst_section import super_resolve_section

    model.eval()
    scores = {}
    for pair in pairs:
        drawn = super_resolve_section(
            model, standardisation, pair, samples=config.samples, steps=config.sample_steps, seed=0, device=device
        )
        prediction, truth = drawn.mean[:, pair.hr_mask].T, pair.hr[:, pair.hr_mask].T
        scores[pair.name] = float(np.nanmean(pearson_per_gene(prediction, truth)))
    return scores
