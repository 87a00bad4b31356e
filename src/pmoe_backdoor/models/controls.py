"""The source papers' own CIFAR architectures, as positive controls beside the pMoE: VGG with BatchNorm (conv ->
BN -> ReLU, the quantizable VGG of Tian et al.'s compression-artifact attacks; depth 11 or 16) and PreAct-ResNet-18
(BackdoorBench's default model, on which Pandey & Ye and the CNN results of the Module-Switching Defense report).

Both follow the model contract of ``pmoe_backdoor.models``: logits from ``model(x)``, the last Linear at
``model.head.fc`` (its input, the globally pooled last map, is the penultimate feature), ``(logits, None)`` for
``return_routing=True`` (no routers). ``width`` scales every channel count (1.0: the published widths; CPU studies use
a fraction), keeping at least one channel. PyTorch's default initialisation, as BackdoorBench's models.

At width 1.0 with 10 classes: VGG-11 9,231,114 parameters, VGG-16 14,728,266, PreAct-ResNet-18 11,171,146
(tests/test_models.py). The VGG layout is the common CIFAR one (3x3 convs with bias, 2x2 max pools after each stage,
one Linear from the 512-channel 1x1 map); Tian et al.'s exact classifier was not verified.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# conv widths per stage ("M": a 2x2 max pool), the CIFAR VGG configurations
VGG_LAYERS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class PooledHead(nn.Module):
    """Global average pool of the last map, then the classifier ``fc``."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class VGG(nn.Module):
    def __init__(self, num_classes: int, depth: int = 16, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG_LAYERS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = scaled(int(item), width)
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.head = PooledHead(channels, num_classes)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        logits = self.head(self.features(x))
        return (logits, None) if return_routing else logits


class PreActBasicBlock(nn.Module):
    """BN-ReLU, then two 3x3 convs (BN-ReLU between them); the shortcut is a 1x1 conv of the activated input when
    the shape changes, else the input itself (He et al.'s identity mappings)."""

    BN_FOLDS = (("conv1", "bn2"),)  # bn2 reads conv1's output only (attacks.fakequant.bn_folds)

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int, width: float = 1.0):
        super().__init__()
        channels = scaled(64, width)
        self.stem = nn.Conv2d(3, channels, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for stage, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            out = scaled(stage, width)
            blocks += [PreActBasicBlock(channels, out, stride), PreActBasicBlock(out, out, 1)]
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = PooledHead(channels, num_classes)  # the 4x4 map averaged, as BackdoorBench's AvgPool2d(4)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        logits = self.head(self.blocks(self.stem(x)))
        return (logits, None) if return_routing else logits


def _check_width(width: float) -> None:
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")


def build_vgg(num_classes: int, depth: int = 16, width: float = 1.0, **ignored: Any) -> nn.Module:
    """VGG-``depth`` (11 or 16) with BatchNorm; the pMoE's keys, when given, do not apply."""
    if depth not in VGG_LAYERS:
        raise ValueError(f"vgg depth must be one of {sorted(VGG_LAYERS)}, got {depth}")
    _check_width(width)
    return VGG(num_classes, depth, width)


def build_preact_resnet18(num_classes: int, width: float = 1.0, **ignored: Any) -> nn.Module:
    _check_width(width)
    return PreActResNet18(num_classes, width)
