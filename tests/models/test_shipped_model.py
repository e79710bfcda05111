"""The checkpoint shipped in the package: safe to load, small, and self-describing."""

from __future__ import annotations

import json

from napari_genemap.checkpoints import shipped_checkpoint
from napari_genemap.data.protocols import hist2st
from napari_genemap.models.checkpoint import load_checkpoint


def test_shipped_checkpoint_is_fp16_safetensors_under_25_mb():
    folder = shipped_checkpoint()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    header_size = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8 : 8 + header_size])
    dtypes = {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
    assert dtypes <= {"F16", "I64"} and "F16" in dtypes
    card = (folder / "README.md").read_text()  # the model card names its data, licence and command
    assert all(words in card for words in ("HER2ST", "CC BY 4.0", "Apache-2.0", "genemap train pixnet"))


def test_shipped_checkpoint_loads_with_its_protocol_and_provenance():
    loaded = load_checkpoint(shipped_checkpoint())
    assert loaded.protocol == hist2st()
    assert loaded.mpp == 2.0 and loaded.stride == 4
    sections = sorted(s["section"] for s in loaded.provenance["training"])
    assert sections == ["B4", "C2", "C3", "C4", "C5"]
    assert loaded.model.config.encoder.name == "tf_efficientnet_lite0"
