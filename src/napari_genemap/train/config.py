"""A training run's settings, readable without torch (the napari panel and the CLI's checks use it).

`TrainConfig` is the one place its defaults live: a stage's settings (`stages.py`) read theirs from it.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..device import check_device_name
from ..errors import GenemapInputError
from ..models.registry import INPUT_MULTIPLE

RAW_TERMS = ("log1p", "poisson", "nb")  # the spot loss's raw-scale term (`losses.RawTerm`)


@dataclass
class TrainConfig:
    """Everything one training run needs; readable from TOML or JSON (`from_file`)."""

    slides: list[dict]  # each {"path": ..., "section": ... (optional), "name": ... (optional)}
    out: str  # checkpoint folder
    validation: list[str] = field(default_factory=list)  # slide names held out for checkpoint selection
    protocol: str = "hist2st"
    mpp: float = 2.0  # µm per input pixel the model works at
    window: int = 256  # training window side, input pixels (multiple of 32)
    batch: int = 8
    steps: int = 400
    lr: float = 5e-4
    encoder_lr_factor: float = 0.3  # the pretrained encoder moves slower than the new decoder
    weight_decay: float = 1e-4
    raw_weight: float = 0.1
    stain_jitter: float = 0.05  # spread of the per-channel optical-density scale (`sampler.stain_jitter`)
    stain_normalise: bool = False  # Macenko: every slide re-stained with the training slides' stains
    raw_loss: str = "log1p"  # the raw-scale term: log1p MSE, or a Poisson / negative-binomial likelihood
    gene_rank: int = 0  # 0: a gene head of its own per gene; k: genes as a learned mix of k components
    gene_basis: list[str] = field(default_factory=list)  # counts tables (.tsv[.gz], .h5ad) the components'
    # PCA is fitted on (a test section's must not be among them); empty: the training slides' spots
    encoder: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    stride: int = 4
    eval_every: int = 100
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    save_dtype: str = "float32"  # "float16" halves the shipped file
    precision: str = "float32"  # "bfloat16": the model's forward pass under autocast (loss and weights stay
    # float32), for GPUs with fast bf16; on the 2-core CPU a long run was no faster (README, issue 13)
    resume: str | None = None  # a checkpoint folder to continue from (its weights and step count)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> TrainConfig:
        check_fields(cls, data, source)
        config = cls(**data)
        config.check(source)
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        return resolve_paths(cls.from_dict(read_config_file(path), source=str(path)), path.parent)

    def check(self, source: str = "config") -> None:
        if not self.slides or not all(isinstance(s, dict) and "path" in s for s in self.slides):
            raise GenemapInputError(f"{source}: field 'slides' must list tables with a 'path'")
        if self.window % INPUT_MULTIPLE:
            raise GenemapInputError(f"{source}: window {self.window}: expected a multiple of {INPUT_MULTIPLE}")
        if self.steps < 1 or self.batch < 1 or self.mpp <= 0:
            raise GenemapInputError(f"{source}: steps, batch and mpp must be positive")
        check_device_name(self.device, f"{source}: device")
        if not 0 <= self.stain_jitter <= 1:
            raise GenemapInputError(f"{source}: stain_jitter {self.stain_jitter}: expected 0 (none) to 1")
        if self.raw_loss not in RAW_TERMS:
            raise GenemapInputError(f"{source}: raw_loss {self.raw_loss!r}: expected one of {', '.join(RAW_TERMS)}")
        if self.gene_rank < 0:
            raise GenemapInputError(f"{source}: gene_rank {self.gene_rank}: expected 0 (full head) or a positive rank")
        if self.gene_basis and not self.gene_rank:
            raise GenemapInputError(f"{source}: gene_basis is given but gene_rank is 0; set the rank it starts")
        if self.save_dtype not in ("float32", "float16"):
            raise GenemapInputError(f"{source}: save_dtype {self.save_dtype!r}: expected float32 or float16")
        if self.precision not in ("float32", "bfloat16"):
            raise GenemapInputError(f"{source}: precision {self.precision!r}: expected float32 or bfloat16")


def check_fields(config_class: type, data: object, source: str) -> None:
    """Refuse, in one line naming ``source``, a training config table that is not a table, names a field
    ``config_class`` does not have, or lacks ``slides`` or ``out``."""
    if not isinstance(data, dict):
        raise GenemapInputError(f"{source}: expected a table of settings")
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GenemapInputError(f"{source}: unknown field {unknown[0]!r}; expected one of {sorted(known)}")
    for required in ("slides", "out"):
        if required not in data:
            raise GenemapInputError(f"{source}: field {required!r} is missing")


def read_config_file(path: Path) -> dict:
    """A training config file's content: TOML (``.toml``) or JSON; one line naming the file when it is not."""
    if not path.is_file():
        raise GenemapInputError(f"{path}: no such training config")
    try:
        return tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GenemapInputError(f"{path}: cannot parse ({error})") from None


def resolve_paths(config, base: Path, extra: tuple[str, ...] = ()):
    """``config`` with its slide, output, resume, gene-basis (and ``extra``) paths made relative to ``base``,
    the config file's folder (empty ones stay empty)."""
    config.slides = [{**s, "path": os.path.normpath(base / s["path"])} for s in config.slides]
    if getattr(config, "gene_basis", None):
        config.gene_basis = [os.path.normpath(base / p) for p in config.gene_basis]
    for name in ("out", "resume", *extra):
        if getattr(config, name):
            setattr(config, name, os.path.normpath(base / getattr(config, name)))
    return config


def slide_name(spec: dict) -> str:
    """The name a run gives a slide: its own, else its section, else its file's stem."""
    return spec.get("name") or spec.get("section") or Path(spec["path"]).stem
