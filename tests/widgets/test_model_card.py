"""The Slide & model panel's model card reads any registered model's checkpoint, not only PixNet's."""

from __future__ import annotations

from napari_genemap.data.protocols import Protocol
from napari_genemap.models.checkpoint import read_checkpoint_config, save_checkpoint
from napari_genemap.widgets.slide_model import model_card_text

GENES = ("g0", "g1", "g2")


def test_the_card_of_a_diffbulk_dense_checkpoint_says_what_it_is(tmp_path, random_checkpoint, tiny_dense):
    model, _ = tiny_dense()
    protocol = Protocol("test", GENES, target_sum=1e4, log="ln")
    folder = save_checkpoint(tmp_path / "dense", model, protocol=protocol, mpp=4.0, window=128)
    text = model_card_text(read_checkpoint_config(folder), folder)
    first = text.splitlines()[0]
    assert first.startswith("Model: dense (DiffBulk dense: PixNet on tf_efficientnet_lite0")
    assert "U-Net (16, 32)" in first and "64 px tiles" in first and "stride 8" in first
    pixnet = model_card_text(read_checkpoint_config(random_checkpoint), random_checkpoint)
    assert pixnet.splitlines()[0] == "Model: small (PixNet: tf_efficientnet_lite0, stride 8)"
