"""Evaluate prediction files against measured spots (what ``genemap evaluate`` runs)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.protocols import Protocol, get_protocol
from ..errors import GenemapDataWarning, GenemapInputError
from .metrics import Evaluation, NanPolicy, Pooling, evaluate


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A spots x genes table from CSV/TSV (first column = spot names) or .h5ad (``X``)."""
    path = Path(path)
    if not path.is_file():
        raise GenemapInputError(f"{path}: file not found")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if path.suffix.lower() == ".h5ad":
            import anndata as ad

            with warnings.catch_warnings():  # duplicate names are refused below, in one line
                warnings.filterwarnings("ignore", "(Observation|Variable) names are not unique")
                adata = ad.read_h5ad(path)
            values = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
            table = pd.DataFrame(values, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
        else:
            table = pd.read_csv(path, sep="\t" if ".tsv" in suffix else ",", index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise GenemapInputError(f"{path}: not a readable table ({error})") from None
    except Exception as error:  # h5py and anndata raise many types for a damaged .h5ad
        raise GenemapInputError(f"{path}: not a readable table ({type(error).__name__}: {error})") from None
    table.index = table.index.astype(str)
    _check_unique(table.index, path, "row (spot) name")
    _check_unique(table.columns.astype(str), path, "column (gene) name")
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise GenemapInputError(f"{path}: column {non_numeric[0]!r} is not numeric; expected one column per gene")
    return table


def _check_unique(names: pd.Index, path: Path, what: str) -> None:
    duplicated = names[names.duplicated()]
    if len(duplicated):
        name = duplicated[0]
        rows = [i + 1 for i in np.flatnonzero(names == name)[:2]]
        raise GenemapInputError(
            f"{path}: {what} {name!r} appears {int((names == name).sum())} times (at {rows[0]} and {rows[1]}); "
            "expected unique names"
        )


def check_counts_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Measured raw counts are finite and not negative: the first bad cell, by row and column, in one line."""
    values = table.to_numpy(np.float64)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise GenemapInputError(
            f"{path}: row {row + 1} (spot {table.index[row]!r}), column {table.columns[column]!r} is "
            f"{values[row, column]:g} ({int(bad.sum())} such values); expected raw counts (finite, not negative)"
        )


def _truth_counts(truth: str | os.PathLike, section: str | None):
    """The measured raw counts as an AnnData, from a slide or a table file."""
    import anndata as ad

    from ..io import counts_table, detect_format, read_slide

    if detect_format(truth) is not None:
        return counts_table(read_slide(truth, section=section))
    table = read_table(truth)
    check_counts_table(table, truth)
    return ad.AnnData(
        X=table.to_numpy(np.float64),
        obs=pd.DataFrame(index=table.index),
        var=pd.DataFrame(index=table.columns),
    )


def resolve_protocol(protocol: str | Protocol, truth_counts) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if str(protocol).endswith(".json"):
        path = Path(protocol)
        if not path.is_file():
            raise GenemapInputError(f"{path}: protocol file not found")
        return Protocol.from_json(path.read_text())
    # triplex / hest pick genes from data; evaluating a file, the only data at hand is the truth itself
    return get_protocol(str(protocol), [truth_counts])


def evaluate_files(
    prediction: str | os.PathLike,
    truth: str | os.PathLike,
    *,
    protocol: str | Protocol = "hist2st",
    section: str | None = None,
    pooling: Pooling = "section",
    nan_policy: NanPolicy = "omit",
) -> Evaluation:
    """Predictions (protocol scale, rows named like the truth's spots) against measured raw counts."""
    counts = _truth_counts(truth, section)
    chosen = resolve_protocol(protocol, counts)
    predicted = read_table(prediction)
    missing = [g for g in chosen.genes if g not in predicted.columns]
    if missing:
        raise GenemapInputError(
            f"{prediction}: {len(missing)} of the {chosen.n_genes} {chosen.name} genes have no column "
            f"(e.g. {', '.join(missing[:3])})"
        )
    shared = counts.obs_names.intersection(predicted.index)
    if len(shared) == 0:
        raise GenemapInputError(
            f"{prediction}: no row names match the measured spots (e.g. truth {counts.obs_names[0]!r}, "
            f"prediction {predicted.index[0]!r})"
        )
    if len(shared) < counts.n_obs:
        warnings.warn(
            GenemapDataWarning(
                f"{prediction}: {counts.n_obs - len(shared)} measured spots have no prediction; "
                f"evaluated the other {len(shared)}"
            ),
            stacklevel=2,
        )
    truth_values = chosen.transform(counts[shared])
    predicted_values = predicted.loc[shared, list(chosen.genes)].to_numpy(np.float64)
    return evaluate(
        predicted_values,
        truth_values,
        chosen.genes,
        pooling=pooling,
        nan_policy=nan_policy,
        protocol=chosen.name,
    )
