"""Gene selection and normalisation as named, serialisable protocols.

A protocol fixes the gene list and the way raw counts (or a model's raw-scale predictions) become the
values that are trained on and evaluated, so a checkpoint that stores its protocol predicts on exactly
the scale it was judged on. The published protocols:

- ``hist2st`` (Hist2ST, HisToGene, HGGEP, Reg2ST on HER2ST): the 785-gene list, counts scaled to a total
  of 1e4 over those genes, then log10(1 + x).
- ``triplex`` (TRIPLEX): the 250 genes of highest mean raw count in the training spots, ``normalize_total``
  to 1e4 over the selected genes, then natural log1p.
- ``hest`` (HEST-Benchmark): the 50 most variable genes (variance of log1p raw counts across the training
  spots), log1p of raw counts, no library-size scaling.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from ..errors import GenemapInputError

if TYPE_CHECKING:
    import anndata as ad
    import torch

PROTOCOL_FORMAT = 1
LogBase = Literal["log10", "ln"]
# normalise works on numpy arrays and on torch tensors (training losses), returning the same kind.
_Values = TypeVar("_Values", np.ndarray, "torch.Tensor")


@cache
def hist2st_genes() -> tuple[str, ...]:
    """The 785 genes of the Hist2ST HER2ST benchmark (shipped as package data)."""
    text = files("napari_genemap.data").joinpath("resources/her2st_785_genes.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class Protocol:
    """Which genes, and how raw counts become targets: optional scaling to ``target_sum``, then a log."""

    name: str
    genes: tuple[str, ...]
    target_sum: float | None = 1e4  # None: no library-size scaling
    log: LogBase = "ln"
    format: int = PROTOCOL_FORMAT

    def __post_init__(self):
        object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))
        if not self.genes:
            raise GenemapInputError(f"protocol {self.name!r}: the gene list is empty; expected at least one gene")
        if len(set(self.genes)) != len(self.genes):
            raise GenemapInputError(f"protocol {self.name!r}: the gene list has duplicate names")
        if self.log not in ("log10", "ln"):
            raise GenemapInputError(f"protocol {self.name!r}: log {self.log!r}; expected 'log10' or 'ln'")

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def counts(self, adata: ad.AnnData) -> np.ndarray:
        """The raw counts of the protocol's genes, (spots, genes) float64, in protocol gene order."""
        missing = [g for g in self.genes if g not in adata.var_names]
        if missing:
            raise GenemapInputError(
                f"protocol {self.name!r}: {len(missing)} of its {self.n_genes} genes are missing from the data "
                f"(e.g. {', '.join(missing[:3])})"
            )
        subset = adata[:, list(self.genes)].X
        return np.asarray(subset.toarray() if hasattr(subset, "toarray") else subset, dtype=np.float64)

    def normalise(self, raw: _Values, total: _Values | None = None, genes: Sequence[str] | None = None) -> _Values:
        """Raw-scale values (spots, genes) -> protocol values; works on numpy arrays and torch tensors.

        ``genes`` names the columns when they are a subset of the protocol's genes; then ``total`` (spots,)
        must give each spot's sum over *all* the protocol's genes, which a total-scaling protocol needs.
        A spot whose total is zero stays all zeros (there is nothing to scale).
        """
        expected = self.n_genes if genes is None else len(genes)
        if genes is not None and not set(genes) <= set(self.genes):
            raise GenemapInputError(f"protocol {self.name!r}: some of the given genes are not among its genes")
        if raw.shape[-1] != expected:
            raise GenemapInputError(f"protocol {self.name!r}: values have {raw.shape[-1]} genes; expected {expected}")
        if genes is not None and len(genes) < self.n_genes and self.target_sum is not None and total is None:
            raise GenemapInputError(f"protocol {self.name!r}: a subset of genes needs each spot's total")
        values = raw
        if self.target_sum is not None:
            # torch accepts numpy's keepdims= as an alias at runtime; its stubs only know keepdim=
            total = values.sum(-1, keepdims=True) if total is None else total.reshape(*total.shape, 1)  # type: ignore[call-overload]
            scale = self.target_sum / (total + (total == 0))
            values = values * scale
        if isinstance(values, np.ndarray):
            return np.log1p(values) / (np.log(10.0) if self.log == "log10" else 1.0)
        return values.log1p() / (float(np.log(10.0)) if self.log == "log10" else 1.0)  # torch tensor

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        """Protocol values of a counts table: ``normalise(counts(adata))``."""
        return self.normalise(self.counts(adata))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["genes"] = list(self.genes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Protocol:
        if not isinstance(data, dict) or "name" not in data or "genes" not in data:
            raise GenemapInputError("protocol: expected a mapping with at least 'name' and 'genes'")
        if int(data.get("format", PROTOCOL_FORMAT)) > PROTOCOL_FORMAT:
            raise GenemapInputError(
                f"protocol {data['name']!r}: format {data['format']} is newer than this napari-genemap "
                f"understands ({PROTOCOL_FORMAT}); update napari-genemap"
            )
        known = {"name", "genes", "target_sum", "log", "format"}
        unknown = set(data) - known
        if unknown:
            raise GenemapInputError(f"protocol: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**{**data, "genes": tuple(data["genes"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Protocol:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise GenemapInputError(f"protocol: not valid JSON ({error})") from None


def hist2st() -> Protocol:
    return Protocol("hist2st", hist2st_genes(), target_sum=1e4, log="log10")


def triplex(training: Iterable[ad.AnnData], n_genes: int = 250) -> Protocol:
    """Top ``n_genes`` by mean raw count over the pooled training spots (genes present in every table)."""
    genes, counts = _pooled_counts(training)
    order = np.argsort(-counts.mean(0), kind="stable")[:n_genes]
    return Protocol("triplex", tuple(genes[i] for i in order), target_sum=1e4, log="ln")


def hest(training: Iterable[ad.AnnData], n_genes: int = 50) -> Protocol:
    """Top ``n_genes`` by variance of log1p raw counts over the pooled training spots."""
    genes, counts = _pooled_counts(training)
    order = np.argsort(-np.log1p(counts).var(0), kind="stable")[:n_genes]
    return Protocol("hest", tuple(genes[i] for i in order), target_sum=None, log="ln")


PROTOCOLS: dict[str, Callable[..., Protocol]] = {"hist2st": hist2st, "triplex": triplex, "hest": hest}


def get_protocol(name: str, training: Sequence[ad.AnnData] | None = None) -> Protocol:
    """A protocol by name; ``triplex`` and ``hest`` choose their genes from ``training``."""
    if name not in PROTOCOLS:
        raise GenemapInputError(f"protocol {name!r} unknown; expected one of {', '.join(PROTOCOLS)}")
    if name == "hist2st":
        return hist2st()
    if not training:
        raise GenemapInputError(f"protocol {name!r} selects genes from training data; none was given")
    return PROTOCOLS[name](training)


def _pooled_counts(tables: Iterable[ad.AnnData]) -> tuple[list[str], np.ndarray]:
    tables = list(tables)
    if not tables:
        raise GenemapInputError("no training tables to select genes from")
    shared = set(tables[0].var_names)
    for table in tables[1:]:
        shared &= set(table.var_names)
    genes = [g for g in tables[0].var_names if g in shared]
    if not genes:
        raise GenemapInputError("the training tables share no gene names")
    blocks = []
    for table in tables:
        block = table[:, genes].X
        blocks.append(np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64))
    return genes, np.vstack(blocks)
