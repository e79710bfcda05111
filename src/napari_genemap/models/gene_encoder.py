"""The open gene encoder of DiffBulk: an expression profile over *any* gene panel -> one vector.

Each gene has a learnable embedding row; a gene's token is its value times its row (no positional
encoding, so gene order carries no meaning), two pre-LN transformer blocks mix the tokens and one learned
query pools them by attention. Unlike the published code, which keys its embedding tables by panel size,
rows here are keyed by gene *symbol* in a vocabulary that grows: panels of any size and overlap share the
rows of the genes they share, and a checkpoint stores the symbols (in ``config.genes``, row order) beside
the weights so every row keeps its meaning when loaded.

Padding: panels of different sizes batch together with a key padding mask (True = padding); padded
positions influence nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from ..errors import GenemapInputError


@dataclass(frozen=True)
class GeneEncoderConfig:
    """The architecture and the vocabulary (gene symbols in row order); saved with a checkpoint."""

    genes: tuple[str, ...] = ()
    dim: int = 256
    heads: int = 8
    layers: int = 2
    ffn_mult: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))
        if len(set(self.genes)) != len(self.genes):
            raise GenemapInputError("gene encoder: the vocabulary has duplicate gene symbols")
        if self.dim % self.heads:
            raise GenemapInputError(f"gene encoder: dim {self.dim} is not a multiple of heads {self.heads}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["genes"] = list(self.genes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GeneEncoderConfig:
        return cls(**{**data, "genes": tuple(data.get("genes", ()))})


class GeneEncoder(nn.Module):
    """Values (batch, genes) over gene rows ``gene_ids`` -> (batch, dim), invariant to gene order."""

    def __init__(self, config: GeneEncoderConfig | None = None):
        super().__init__()
        config = config or GeneEncoderConfig()
        self._config = replace(config, genes=())  # the genes live in self.genes, which grows
        self.genes: list[str] = []
        self.index: dict[str, int] = {}
        self.embedding = nn.Parameter(torch.empty(0, config.dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.dim,
                config.heads,
                dim_feedforward=config.ffn_mult * config.dim,
                dropout=config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.dim)  # pre-LN blocks leave the residual stream unnormalised
        self.query = nn.Parameter(torch.randn(1, 1, config.dim) * 0.02)
        self.pool = nn.MultiheadAttention(config.dim, config.heads, dropout=config.dropout, batch_first=True)
        self.add_genes(config.genes)

    @classmethod
    def from_config(cls, config: GeneEncoderConfig) -> GeneEncoder:
        return cls(config)

    @property
    def config(self) -> GeneEncoderConfig:
        """The architecture with the current vocabulary: what rebuilds this encoder's rows in order."""
        return replace(self._config, genes=tuple(self.genes))

    @property
    def dim(self) -> int:
        return self._config.dim

    def add_genes(self, genes: Sequence[str]) -> list[int]:
        """Append rows for the genes not yet in the vocabulary (old rows unchanged); their row indices.

        Growing replaces the ``embedding`` parameter, so add every training panel's genes before an
        optimiser is built (or rebuild it after)."""
        new = [g for g in dict.fromkeys(str(g) for g in genes) if g not in self.index]
        if new:
            rows = torch.randn(len(new), self.dim, dtype=self.embedding.dtype, device=self.embedding.device) * 0.02
            self.embedding = nn.Parameter(torch.cat([self.embedding.data, rows]))
            for gene in new:
                self.index[gene] = len(self.genes)
                self.genes.append(gene)
        return [self.index[str(g)] for g in genes]

    def gene_ids(self, genes: Sequence[str], grow: bool = False) -> torch.Tensor:
        """Row indices (long) of ``genes``; unseen genes are added when ``grow``, else refused."""
        unseen = [str(g) for g in genes if str(g) not in self.index]
        if unseen and not grow:
            raise GenemapInputError(
                f"gene encoder: {len(unseen)} genes are not in its vocabulary of {len(self.genes)} "
                f"(e.g. {', '.join(unseen[:3])}); pass grow=True to add them"
            )
        return torch.tensor(self.add_genes(genes) if unseen else [self.index[str(g)] for g in genes])

    def forward(
        self, values: torch.Tensor, gene_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``values`` (B, G) float, ``gene_ids`` (B, G) long, ``padding_mask`` (B, G) bool, True = padding.

        A row that is all padding (an empty panel) gives a zero vector instead of attention's NaN."""
        tokens = values.unsqueeze(-1).to(self.embedding.dtype) * self.embedding[gene_ids]
        empty = None
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
            empty = padding_mask.all(1)
            if empty.any():
                padding_mask = padding_mask.clone()
                padding_mask[empty, 0] = False
            tokens = tokens.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        for block in self.blocks:
            tokens = block(tokens, src_key_padding_mask=padding_mask)
        tokens = self.norm(tokens)
        query = self.query.expand(len(tokens), -1, -1)
        pooled, _ = self.pool(query, tokens, tokens, key_padding_mask=padding_mask, need_weights=False)
        pooled = pooled.squeeze(1)
        if empty is not None and empty.any():
            pooled = pooled.masked_fill(empty.unsqueeze(-1), 0.0)
        return pooled

    def batch_panels(
        self, panels: Sequence[tuple[Sequence[str], Sequence[float] | np.ndarray | torch.Tensor]], grow: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(genes, values) panels of any sizes -> padded ``values``, ``gene_ids`` and ``padding_mask``."""
        width = max((len(genes) for genes, _ in panels), default=0)
        device, dtype = self.embedding.device, self.embedding.dtype
        values = torch.zeros(len(panels), width, dtype=dtype, device=device)
        ids = torch.zeros(len(panels), width, dtype=torch.long, device=device)
        mask = torch.ones(len(panels), width, dtype=torch.bool, device=device)
        for row, (genes, panel_values) in enumerate(panels):
            panel = torch.as_tensor(np.asarray(panel_values, dtype=np.float64), dtype=dtype, device=device)
            if panel.shape != (len(genes),):
                raise GenemapInputError(f"gene encoder: a panel of {len(genes)} genes has {tuple(panel.shape)} values")
            values[row, : len(genes)] = panel
            ids[row, : len(genes)] = self.gene_ids(genes, grow=grow).to(device)
            mask[row, : len(genes)] = False
        return values, ids, mask

    def encode(
        self, panels: Sequence[tuple[Sequence[str], Sequence[float] | np.ndarray | torch.Tensor]], grow: bool = False
    ) -> torch.Tensor:
        """Profiles over named genes -> (len(panels), dim): `batch_panels` then `forward`."""
        return self(*self.batch_panels(panels, grow=grow))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        """A state dict whose vocabulary differs in size names itself instead of a bare shape mismatch."""
        key = prefix + "embedding"
        if key in state_dict and state_dict[key].shape[0] != len(self.genes):
            errors.append(
                f"gene encoder: the weights hold {state_dict[key].shape[0]} gene rows but the vocabulary has "
                f"{len(self.genes)} symbols; build the encoder from the checkpoint's config (its gene list)"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)
