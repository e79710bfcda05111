"""Evaluate spot predictions against measured spots under a named protocol.

Until a model ships, the "prediction" here is a simple one: every spot gets the mean profile of the other
sections' spots, scaled to the spot's own library size (no image at all). It shows the protocol line
and the table every reported number carries. Run: ``.venv/bin/python examples/evaluate_predictions.py``.
"""

import warnings
from pathlib import Path

import numpy as np

from napari_genemap.data import hist2st
from napari_genemap.evaluate import evaluate
from napari_genemap.io import counts_table, read_her2st

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
SECTIONS = ["B4", "C2", "C3", "C4", "C5"]

warnings.simplefilter("ignore")
protocol = hist2st()
raw = {section: protocol.counts(counts_table(read_her2st(DATA, section))) for section in SECTIONS}
predictions, truths, labels = [], [], []
for held_out in SECTIONS:
    training = np.vstack([raw[s] for s in SECTIONS if s != held_out])
    mean_profile = training.sum(0) / training.sum()
    library = raw[held_out].sum(1, keepdims=True)
    predictions.append(protocol.normalise(library * mean_profile))  # identical profile, scaled
    truths.append(protocol.normalise(raw[held_out]))
    labels += [held_out] * len(library)
result = evaluate(np.vstack(predictions), np.vstack(truths), protocol.genes, labels, protocol=protocol.name)
print(result.describe())
print(result.summary.round(4).to_string())
print(
    "After normalisation this baseline gives every spot one and the same profile, except spots with no counts\n"
    "over the 785 genes (all zeros). Sections with such spots get small, defined correlations from them alone;\n"
    "C4 has none, so its prediction is constant and every gene is undefined (the n_undefined column)."
)
