"""ResNet-50 (v1.5) and MobileNetV2 in PyTorch, for the space-only baseline of Figure 3.

The same layer shapes as ``models/resnet.py`` and ``models/mobilenetv2.py`` (torchvision's
layout: NCHW, stride on the bottleneck's 3x3, symmetric padding), so that the PyTorch
baselines run the same arithmetic as the JAX models; weights are drawn per model by
PyTorch (Kaiming normal, fan-out, as torchvision), BatchNorm in inference mode.
torchvision is not required.
"""

from __future__ import annotations

import torch
from torch import nn

# (expand ratio t, output channels c, repeats n, first stride s): MobileNetV2's Table 2.
_MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_MOBILENET_TINY = ((1, 8, 1, 1), (4, 8, 2, 2), (4, 16, 1, 2))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    def __init__(self, cin: int, features: int, stride: int):
        super().__init__()
        cout = 4 * features
        self.body = nn.Sequential(
            *_conv_bn(cin, features, 1, 1), nn.ReLU(inplace=True),
            *_conv_bn(features, features, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(features, cout, 1, 1),
        )
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, stage_sizes: tuple[int, ...], stage_features: tuple[int, ...], stem: int, classes: int):
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, stem, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        cin = stem
        for stage, (blocks, features) in enumerate(zip(stage_sizes, stage_features)):
            for index in range(blocks):
                layers.append(Bottleneck(cin, features, 2 if stage > 0 and index == 0 else 1))
                cin = 4 * features
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True), *_conv_bn(hidden, cout, 1, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, stem: int, stages: tuple, last: int, classes: int):
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, stem, 3, 2), nn.ReLU6(inplace=True)]
        cin = stem
        for expand, cout, repeats, stride in stages:
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers += [*_conv_bn(cin, last, 1, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def build(name: str, size: str = "full", seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    """(model in eval mode with weights drawn from ``seed``, input shape [C, H, W])."""
    torch.manual_seed(seed)
    if name == "resnet50":
        model = (
            ResNet((3, 4, 6, 3), (64, 128, 256, 512), 64, 1000) if size == "full" else ResNet((1, 1), (4, 8), 8, 10)
        )
        image = 224 if size == "full" else 32
    elif name == "mobilenetv2":
        model = MobileNetV2(32, _MOBILENET_STAGES, 1280, 1000) if size == "full" else MobileNetV2(8, _MOBILENET_TINY, 32, 10)
        image = 224 if size == "full" else 16
    else:
        raise ValueError(f"no PyTorch version of {name!r}; expected resnet50 or mobilenetv2")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.running_mean, std=0.1)
            nn.init.uniform_(module.running_var, 0.5, 1.5)
    return model.eval(), (3, image, image)
