"""Architectures of the embedded zoo: one module instance per activation, no in-place ops
(captum's hooks need both: meta-pytorch/captum#1082, #1104)."""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


def _conv_block(c_in: int, c_out: int, *, stride: int = 1, pool: bool = False) -> nn.Sequential:
    """conv3x3 -> batch norm -> ReLU (-> 2x2 max-pool)."""
    layers = [("conv", nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)),
              ("bn", nn.BatchNorm2d(c_out)), ("relu", nn.ReLU())]
    return nn.Sequential(OrderedDict(layers + ([("pool", nn.MaxPool2d(2))] if pool else [])))


class SmallCNN(nn.Module):
    """VGG-style plain convnet (no skip connections): five conv3x3-BN-ReLU layers (widths w, 2w,
    4w, 4w, 4w; as torchvision's vgg*_bn), the first with stride 2 (a quarter of the CPU cost of
    a full-resolution first layer), max-pooling down to 8x8 at 64 px, global average pooling,
    and a two-layer classifier. Shallower or without batch norm, it stayed below 95% test
    accuracy within a CPU training budget of about a minute."""

    mprt_layers = ("features.block1", "features.block2", "features.block3", "features.block4",
                   "features.block5", "classifier.fc1", "classifier.fc2")                      # input to output

    def __init__(self, num_classes: int = 6, *, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(OrderedDict(
            block1=_conv_block(3, w, stride=2), block2=_conv_block(w, 2 * w, pool=True),
            block3=_conv_block(2 * w, 4 * w), block4=_conv_block(4 * w, 4 * w, pool=True),
            block5=_conv_block(4 * w, 4 * w),
        ))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(4 * w, 4 * w), relu=nn.ReLU(), fc2=nn.Linear(4 * w, num_classes)
        ))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))          # (B, classes)


class BasicBlock(nn.Module):
    """Residual block (He et al. 2016): relu(bn(conv(relu(bn(conv x)))) + shortcut x)."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(nn.Module):
    """Small residual net with batch norm: a stride-2 stem, three one-block stages (widths w, 2w,
    4w; resolution 32, 16, 8 at 64 px), global average pooling, linear classifier."""

    mprt_layers = ("stem", "layer1", "layer2", "layer3", "fc")   # randomized as units, input to output

    def __init__(self, num_classes: int = 6, *, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), bn=nn.BatchNorm2d(w), relu=nn.ReLU()))
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.layer3 = BasicBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))                                  # (B, classes)
