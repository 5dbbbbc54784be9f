"""The DLHEIR network (and the paper's baseline), as a readable ``nn.Module``.

DLHEIR (paper section 3.3.2):

* torchvision's DenseNet201 ``features`` (dense blocks of 6, 12, 48, 32 layers);
* the last 14 dense layers of dense block 4 are removed. After the 18 kept layers the
  block outputs 896 + 18 * 32 = 1472 channels; one MobileNetV2 inverted residual block
  (``InvertedResidual`` below: 1x1 expansion, BN, ReLU6, 3x3 depthwise, BN, ReLU6, 1x1
  linear projection, BN, identity shortcut) takes their place, 1472 -> 1472 channels, so
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

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import DenseNet201_Weights, densenet201

from dlheir.contract import validate_bits
from dlheir.errors import UserError

ARCHS = ("dlheir", "baseline")
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


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block (stride 1): expand, depthwise, linear project, add.

    1x1 conv (channels -> hidden), BN, ReLU6; 3x3 depthwise conv, BN, ReLU6; 1x1 conv
    (hidden -> out_channels), BN with no activation (the linear bottleneck); the input is
    added when the shapes match.
    """

    def __init__(self, channels: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.use_residual = channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_residual else y


class HashLayer(nn.Module):
    """Conv2d 1x1 (N filters) -> BatchNorm -> sigmoid -> global average pooling."""

    def __init__(self, in_channels: int, bits: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, bits, kernel_size=1)
        self.bn = nn.BatchNorm2d(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(x))).mean(dim=(2, 3))


class DLHEIR(nn.Module):
    def __init__(self, bits: int, num_classes: int, arch: str = "dlheir") -> None:
        super().__init__()
        bits = validate_bits(bits)
        if arch not in ARCHS:
            raise UserError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if num_classes < 2:
            raise UserError(f"need at least 2 classes, got {num_classes}")
        self.bits, self.num_classes, self.arch = bits, num_classes, arch
        self.normalize = Normalize()
        self.features = densenet201(weights=None).features
        channels = self.features.norm5.num_features  # 1920
        if arch == "dlheir":
            block4 = self.features.denseblock4
            kept = len(block4) - REPLACED_LAYERS
            for name in list(block4._modules)[kept:]:
                del block4._modules[name]
            channels = block4.denselayer1.norm1.num_features + kept * block4.denselayer1.conv2.out_channels
            hidden = int(round(channels * EXPAND_RATIO))
            self.features.inverted_residual = InvertedResidual(channels, channels, hidden)
            # norm5 must stay last in `features`: re-create it after the new block
            del self.features._modules["norm5"]
            self.features.norm5 = nn.BatchNorm2d(channels)
        self.hash = HashLayer(channels, bits)
        self.classifier = nn.Linear(bits, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.relu(self.features(self.normalize(x)))
        probs = self.hash(feats)
        return probs, self.classifier(probs)


def _load_imagenet_backbone(model: DLHEIR) -> None:
    try:
        state = DenseNet201_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as exc:  # no internet, proxy, corrupt cache ...
        raise UserError(
            f"cannot get torchvision's ImageNet DenseNet201 weights ({type(exc).__name__}: {exc}); "
            "use --weights none or --weights PATH to a local state dict"
        ) from exc
    own = model.features.state_dict()
    loaded = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        key = key[len("features."):]
        # torchvision's old checkpoints name layers 'norm.1'; the module uses 'norm1'
        key = key.replace("norm.1", "norm1").replace("norm.2", "norm2").replace("conv.1", "conv1").replace("conv.2", "conv2")
        if key in own:
            if own[key].shape == value.shape:
                loaded[key] = value
            elif key.startswith("norm5.") and value.ndim == 1:  # keep the first channels
                loaded[key] = value[: own[key].shape[0]]
    model.features.load_state_dict(loaded, strict=False)


def build_model(bits: int, num_classes: int, arch: str = "dlheir", weights: str = "none") -> DLHEIR:
    """Build DLHEIR or the baseline; ``weights`` is 'imagenet', 'none' or a path to a state dict."""
    model = DLHEIR(bits, num_classes, arch)
    if weights == "imagenet":
        _load_imagenet_backbone(model)
    elif weights != "none":
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
