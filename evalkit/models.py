"""Small hand-written models (torchvision does not import beside torch 2.13 CPU here).

``SmallCNN``: the demo/test network, Conv-BN-ReLU blocks and a Linear head::

    x -> conv3x3-BN-ReLU(w) -> maxpool -> conv3x3-BN-ReLU(2w) -> maxpool -> conv3x3-BN-ReLU(4w) -> avgpool -> fc

``resnet18_cifar``: the CIFAR-style ResNet-18 (11M parameters) for the speed benchmark.

``MLP``: an MLP head / tabular net with BatchNorm1d (PDA on (N, C) inputs)::

    x -> flatten -> [Linear-BN1d-ReLU] x len(hidden) -> Linear

``LeNet``: LeNet-5 style, no BatchNorm, average pooling (issue 13, round 4: an architecture the
audit's earlier sets never held)::

    x -> conv5x5-ReLU(w) -> avgpool -> conv5x5-ReLU(16) -> avgpool -> fc-ReLU(120) -> fc-ReLU(84) -> fc

``DepthwiseCNN``: MobileNet-style depthwise-separable blocks (issue 13, round 5: an architecture the
audit's earlier sets never held)::

    x -> conv3x3-BN-ReLU(w) -> [dwconv3x3-BN-ReLU -> conv1x1-BN-ReLU(2c) -> maxpool if side >= 8] x 2
      -> avgpool -> fc

``AllConvNet``: all-convolutional (Springenberg et al. style): stride-2 convs instead of pooling (issue 13,
round 6: an architecture the audit's earlier sets never held)::

    x -> conv3x3-BN-ReLU(w) -> conv3x3/s-BN-ReLU(2w) -> conv3x3-BN-ReLU(2w) -> conv3x3/s-BN-ReLU(4w) -> avgpool -> fc

``InvertedResidualCNN``: MobileNetV2-style inverted residual blocks (issue 13, round 6)::

    x -> conv3x3-BN-ReLU(w) -> [conv1x1-BN-ReLU(e*c) -> dwconv3x3/s-BN-ReLU -> conv1x1-BN(c')] (+ x if same shape) x 2
      -> avgpool -> fc

``TinyTransformer``: a pre-LN transformer encoder (Linear + LayerNorm + attention, no BN) that
reads an image row by row as a token sequence: the LLM-style Linear stack of the tests.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "LeNet", "DepthwiseCNN", "AllConvNet", "InvertedResidualCNN", "InvertedResidual", "MLP",
           "SmallResNet", "resnet18_cifar", "BasicBlock", "ResNet", "TinyTransformer"]


def _cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(*_cbr(in_channels, w), nn.MaxPool2d(2), *_cbr(w, 2 * w), nn.MaxPool2d(2),
                                      *_cbr(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class LeNet(nn.Module):
    """LeNet-5 style for ``image_size`` x ``image_size`` inputs (a multiple of 4): two 5x5 convs (padding
    2) each followed by ReLU and 2x2 average pooling, then Linear-ReLU 120, Linear-ReLU 84, Linear. No BN."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(width, 16, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * (image_size // 4) ** 2, 120), nn.ReLU(),
                                        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DepthwiseCNN(nn.Module):
    """MobileNet-style for ``image_size`` x ``image_size`` inputs: a 3x3 conv-BN-ReLU stem (``width``
    channels), then two depthwise-separable blocks, each a 3x3 depthwise conv (groups = channels)-BN-ReLU
    and a 1x1 pointwise conv-BN-ReLU doubling the channels, followed by 2x2 max pooling while the map is
    at least 8 wide (8x8 digits: 8 -> 4 -> 4; 28x28: 28 -> 14 -> 7); global average pooling, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 8) -> None:
        super().__init__()
        layers, c, side = _cbr(in_channels, width), width, image_size
        for _ in range(2):
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU()]
            c *= 2
            if side >= 8:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class AllConvNet(nn.Module):
    """All-convolutional (Springenberg et al., "Striving for Simplicity") for ``image_size`` x ``image_size``
    inputs: four 3x3 conv-BN-ReLU blocks (``width``, 2w, 2w, 4w channels) where the second and fourth
    downsample by stride 2 while the map is at least 8 wide (8x8 digits: 8 -> 4 -> 4; 28x28: 28 -> 14 -> 7);
    no pooling but the final global average pooling, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 8) -> None:
        super().__init__()
        w, side, layers = width, image_size, []
        for cin, cout, down in ((in_channels, w, False), (w, 2 * w, True), (2 * w, 2 * w, False), (2 * w, 4 * w, True)):
            stride = 2 if down and side >= 8 else 1
            layers += _cbr(cin, cout, stride)
            side = (side + stride - 1) // stride
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand conv-BN-ReLU (``expand`` x cin), 3x3 depthwise conv-BN-ReLU
    (``stride``), 1x1 project conv-BN with no activation; the input is added when the shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        h = expand * cin
        self.expand = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


class InvertedResidualCNN(nn.Module):
    """MobileNetV2-style for ``image_size`` x ``image_size`` inputs: a 3x3 conv-BN-ReLU stem (``width``
    channels, stride 2 on inputs at least 16 wide), an :class:`InvertedResidual` block keeping the
    shape (residual add) and one doubling the channels (stride 2 while the map is at least 8 wide, no
    residual); global average pooling, Linear. ReLU, not ReLU6 (torch.ao fuses Conv-BN-ReLU)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 8,
                 expand: int = 4) -> None:
        super().__init__()
        stem_stride = 2 if image_size >= 16 else 1
        side = (image_size + stem_stride - 1) // stem_stride
        self.stem = nn.Sequential(*_cbr(in_channels, width, stem_stride))
        self.block1 = InvertedResidual(width, width, 1, expand)
        self.block2 = InvertedResidual(width, 2 * width, 2 if side >= 8 else 1, expand)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(self.stem(x)))), 1))


class MLP(nn.Module):
    """Flattened input -> ``Linear-BatchNorm1d-ReLU`` per hidden width -> Linear head."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(in_features, h), nn.BatchNorm1d(h), nn.ReLU()]
            in_features = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            layers.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallResNet(nn.Module):
    """A residual CNN for 1-channel images: stem conv-BN-ReLU(w), two BasicBlocks (w, then 2w with
    stride 2 and a 1x1 conv-BN downsample), global average pooling, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(in_channels, width))
        self.block1, self.block2 = BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(self.stem(x)))), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.out(torch.matmul(att, v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.ln2, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp), nn.ReLU(), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Image rows as tokens: (B, 1, H, W) -> H tokens of width W -> Linear embed + position ->
    ``depth`` pre-LN blocks (multi-head attention, ReLU MLP) -> LayerNorm -> mean -> Linear."""

    def __init__(self, seq_len: int = 8, token_dim: int = 8, num_classes: int = 10, dim: int = 32, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(token_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio * dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1, 2)) + self.pos  # (B, 1, H, W) -> (B, H, W) tokens
        return self.head(self.norm(self.blocks(x)).mean(1))
