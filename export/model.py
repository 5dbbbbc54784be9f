"""The DLHEIR network (and the paper's baseline), as a readable ``nn.Module``.

DLHEIR (paper section 3.3.2):

* torchvision's DenseNet201 ``features`` (dense blocks of 6, 12, 48, 32 layers);
* the last 14 dense layers of dense block 4 are removed. After the 18 kept layers the
  block outputs 896 + 18 * 32 = 1472 channels; one MobileNetV2 inverted residual block
  (torchvision's own ``InvertedResidual``: 1x1 expansion, BN, ReLU6, 3x3 depthwise, BN,
  ReLU6, 1x1 linear projection, BN, identity shortcut) takes their place, 1472 -> 1472 channels, so
  no transition layer is needed and ``norm5`` just shrinks to 1472 channels.
  Channel choice: the block's input is DenseNet's wide concatenation (1472), not a narrow
  MobileNetV2 bottleneck, so the usual expansion t = 6 would cost 26 M parameters. The
  hidden width is 736 (expand ratio 0.5): the block has 2.2 M parameters against 3.5 M
  for the 14 dense layers it replaces (and fewer FLOPs), which is the paper's point. With
  t = 1 the expansion conv alone would be 2.2 M and the block (4.3 M) would outweigh them;
* ``norm5`` shrinks to the 1472 channels (with ImageNet weights it keeps the first 1472
  channels of the original ``norm5``, which are the same feature maps);
* the hash layer: Conv2d 1x1 with N filters, BatchNorm, sigmoid, global average
  pooling -> N values in (0, 1);
* a linear classifier on those N values, used only for training.

The baseline ("original DenseNet201 + hash layer", Table 2) keeps all 32 layers.

Input: **pixels**, float32 [B, 3, S, S] with values 0..255 (RGB, warped to S x S by
``dlheir.preprocess``; ``to_input`` turns its uint8 [B, S, S, 3] into this). The network's
first layer (``Normalize``) applies the ImageNet mean/std that torchvision's DenseNet201
weights were trained with, so training, evaluation and the exported graph feed the same
pixels and normalisation exists only here. ``forward`` returns ``(probs, logits)``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import DenseNet201_Weights, densenet201
from torchvision.models.mobilenetv2 import InvertedResidual

from dlheir.contract import validate_bits
from dlheir.errors import UserError
from dlheir.export.defaults import ARCHS

REPLACED_LAYERS = 14  # dense layers of block 4 replaced by the inverted residual block
EXPAND_RATIO = 0.5  # hidden width of the inverted residual block / its 1472 input channels
# The statistics torchvision's ImageNet DenseNet201 weights were trained with, read from their
# own preset (no download): the network normalises with these whatever its weights.
_PRESET = DenseNet201_Weights.IMAGENET1K_V1.transforms()
MEAN, STD = tuple(_PRESET.mean), tuple(_PRESET.std)


def to_input(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, S, S, 3] (``dlheir.preprocess``) -> the network's input, float32 [B, 3, S, S] 0..255."""
    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
    return x.permute(0, 3, 1, 2).to(torch.float32)


class Normalize(nn.Module):
    """Pixels 0..255 -> ImageNet-normalised values: ``(x / 255 - MEAN) / STD``.

    Constant buffers (not in the state dict: they are not learned and never change).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class HashLayer(nn.Module):
    """Conv2d 1x1 (N filters) -> BatchNorm -> sigmoid -> global average pooling."""

    def __init__(self, in_channels: int, bits: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, bits, kernel_size=1)
        self.bn = nn.BatchNorm2d(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(x))).mean(dim=(2, 3))


class DLHEIR(nn.Module):
    """``imagenet=True`` starts the backbone from torchvision's ImageNet DenseNet201 weights
    (``DenseNet201_Weights.IMAGENET1K_V1``, downloaded once into torch's cache); the default
    is a random initialisation that never touches the network."""

    def __init__(self, bits: int, num_classes: int, arch: str = "dlheir", imagenet: bool = False) -> None:
        super().__init__()
        bits = validate_bits(bits)
        if arch not in ARCHS:
            raise UserError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if num_classes < 2:
            raise UserError(f"need at least 2 classes, got {num_classes}")
        self.bits, self.num_classes, self.arch = bits, num_classes, arch
        self.normalize = Normalize()
        parts = OrderedDict(densenet201(weights=DenseNet201_Weights.IMAGENET1K_V1 if imagenet else None)
                            .features.named_children())
        norm5 = parts["norm5"]
        channels = norm5.num_features  # 1920
        if arch == "dlheir":
            block4 = parts["denseblock4"]  # a ModuleDict of dense layers
            kept = len(block4) - REPLACED_LAYERS
            for name in list(block4.keys())[kept:]:
                block4.pop(name)
            channels = block4["denselayer1"].norm1.num_features + kept * block4["denselayer1"].conv2.out_channels
            del parts["norm5"]  # norm5 stays last: after the new block, shrunk to its channels
            parts["inverted_residual"] = InvertedResidual(channels, channels, stride=1, expand_ratio=EXPAND_RATIO)
            parts["norm5"] = _first_channels(norm5, channels)
        self.features = nn.Sequential(parts)
        self.hash = HashLayer(channels, bits)
        self.classifier = nn.Linear(bits, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.relu(self.features(self.normalize(x)))
        probs = self.hash(feats)
        return probs, self.classifier(probs)


def _first_channels(norm: nn.BatchNorm2d, channels: int) -> nn.BatchNorm2d:
    """A BatchNorm over the first ``channels`` of ``norm``'s (block 4 concatenates, so the kept
    layers' feature maps are the first channels), with their statistics and affine weights."""
    out = nn.BatchNorm2d(channels)
    with torch.no_grad():
        for name, value in norm.state_dict().items():
            out.state_dict()[name].copy_(value[:channels] if value.ndim else value)
    return out


def build_model(bits: int, num_classes: int, arch: str = "dlheir", weights: str = "none") -> DLHEIR:
    """Build DLHEIR or the baseline; ``weights`` is 'none' (default, random init), 'imagenet'
    (torchvision's weights API, downloaded once) or a path to a state dict."""
    if weights == "imagenet":
        try:
            return DLHEIR(bits, num_classes, arch, imagenet=True)
        except UserError:
            raise
        except Exception as exc:  # no internet, proxy, corrupt cache ...
            raise UserError(
                f"cannot get torchvision's ImageNet DenseNet201 weights ({type(exc).__name__}: {exc}); "
                "use --weights none or --weights PATH to a local state dict"
            ) from exc
    model = DLHEIR(bits, num_classes, arch)
    if weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--weights: no such file {path} (use 'imagenet', 'none' or a state dict path)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"--weights: cannot read {path}: {exc}") from exc
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) == len(model.state_dict()):
            raise UserError(f"--weights: {path} has none of this model's parameters")
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
