"""Architectures of the embedded zoo: one module instance per activation, no in-place ops
(captum's hooks need both: meta-pytorch/captum#1082, #1104)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from methods.lrp import ResidualSumCanonizer


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

    def add(self, out: Tensor, shortcut: Tensor) -> Tensor:
        """The residual addition, a method so LRP can give it a rule (ResidualSumCanonizer)."""
        return out + shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(self.add(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))), self.shortcut(x)))


class ResNet(nn.Module):
    """Small residual net with batch norm: a stride-2 stem, three one-block stages (widths w, 2w,
    4w; resolution 32, 16, 8 at 64 px), global average pooling, linear classifier."""

    mprt_layers = ("stem", "layer1", "layer2", "layer3", "fc")   # randomized as units, input to output
    lrp_canonizers = (ResidualSumCanonizer(BasicBlock),)           # LRP's Norm rule on the residual sums

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


_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class VGG(nn.Module):
    """Plain VGG-style convnet (Simonyan & Zisserman 2015) without batch norm: conv3x3-act layers of
    widths w, 2w, 4w, 4w, 4w (the first with stride 2), 2x2 max-pools down to 8x8 at 64 px, global
    average pooling and a two-layer classifier. `activation` picks the non-linearity (relu, silu,
    gelu), one module instance per use. Weights use He (kaiming) initialisation for ReLU, which a
    net without normalisation needs: with it, 10 epochs at lr 3e-3 reach 98% test accuracy on
    `shapes` (8 epochs at lr 1e-3 only 71%)."""

    mprt_layers = ("features.conv1", "features.conv2", "features.conv3", "features.conv4", "features.conv5",
                   "classifier.fc1", "classifier.fc2")                                       # input to output

    def __init__(self, num_classes: int = 6, *, width: int = 16, activation: str = "relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act, w = _ACTIVATIONS[activation], width
        widths = [(3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 4 * w)]
        layers: list[tuple[str, nn.Module]] = []
        for i, (c_in, c_out) in enumerate(widths, 1):
            layers += [(f"conv{i}", nn.Conv2d(c_in, c_out, 3, stride=2 if i == 1 else 1, padding=1)),
                       (f"act{i}", act())]
            if i in (2, 4):
                layers.append((f"pool{i}", nn.MaxPool2d(2)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(4 * w, 4 * w), act=act(), fc2=nn.Linear(4 * w, num_classes)))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))          # (B, classes)


class PositionEmbedding(nn.Module):
    """Adds a learned position embedding (1, N, D) to the tokens; its own module so MPRT can randomize it."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, tokens, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight                                                   # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(d)) v, written out so every step is hookable."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
        attn = (q @ k.transpose(-2, -1) * (D // self.heads) ** -0.5).softmax(dim=-1)             # (B, h, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)), GELU in the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, mlp_ratio * dim), act=nn.GELU(), fc2=nn.Linear(mlp_ratio * dim, dim)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))                                       # (B, N, D)


class TokenGrid(nn.Module):
    """(B, N, D) tokens -> (B, D, h, w) map, N = h * w: makes the last token grid a spatial layer for CAMs."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        h = round(N ** 0.5)
        return x.transpose(1, 2).reshape(B, D, h, N // h)


class ViT(nn.Module):
    """Vision transformer with a convolutional stem (Xiao et al. 2021, "Early convolutions help
    transformers see better"): four conv3x3-BN-ReLU layers (strides 2, 2, 1, 2) and a 1x1 conv turn
    a 64 px image into an 8x8 grid of `dim`-d tokens (patch size 8), plus a learned position
    embedding; `depth` pre-norm transformer blocks (Dosovitskiy et al. 2021), a final layer norm,
    mean pooling over tokens (no class token) and a linear head. The final tokens are reshaped to a
    (B, dim, 8, 8) map by `grid`, the layer Grad-CAM and the other CAMs find and use. A plain ViT
    with linear 8x8 patches reached only 56% in 12 epochs; a three-layer stride-2 stem with depth 4
    82% in 8 epochs; this one (depth 2) 94% on 6000 training images and 97.7% on 10000."""

    def __init__(self, num_classes: int = 6, *, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 2, stem_width: int = 16, tokens: int = 64):
        super().__init__()
        w = stem_width
        self.stem = nn.Sequential(OrderedDict(
            block1=_conv_block(3, w, stride=2), block2=_conv_block(w, 2 * w, stride=2),
            block3=_conv_block(2 * w, 4 * w), block4=_conv_block(4 * w, 4 * w, stride=2),
            proj=nn.Conv2d(4 * w, dim, 1)))
        self.pos = PositionEmbedding(tokens, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.grid = TokenGrid()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)
        self.mprt_layers = ("stem", "pos", *(f"blocks.{i}" for i in range(depth)), "norm", "head")

    def forward(self, x: Tensor) -> Tensor:
        t = self.stem(x)                                                         # (B, D, h, w)
        B, D, h, w = t.shape
        if h * w != self.pos.weight.shape[1]:
            raise ValueError(f"the stem makes a {h}x{w} token grid from a {tuple(x.shape[2:])} input, but the "
                             f"position embedding has {self.pos.weight.shape[1]} tokens: set tokens={h * w}")
        t = self.blocks(self.pos(t.flatten(2).transpose(1, 2)))                 # (B, N, D)
        return self.head(self.pool(self.grid(self.norm(t))).flatten(1))          # (B, classes)
