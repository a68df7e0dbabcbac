"""GAN discriminators for decoder training. Both take images in [0, 1] and return logits (B, K).

- `small`: a trainable patch discriminator (strided spectral-norm convs) for small images, usable
  offline with no pretrained weights.
- `dino`: the reference design: a frozen DINO ViT-S/8 with trainable per-token heads on the
  tokens of blocks 2/5/8/11 and on its output.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from rae_core.errors import ConfigError


class SmallDiscriminator(nn.Module):
    """Three stride-2 convs and a 3x3 logit conv: one logit per (R/8 x R/8) patch."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [spectral_norm(nn.Conv2d(c_in, c, 4, stride=2, padding=1)),
                       nn.LeakyReLU(0.2)]
            c_in = c
        layers.append(spectral_norm(nn.Conv2d(c_in, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2 - 1).flatten(1)  # (B, (R/8)^2)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT-S/8 at 224 px; a spectral-norm MLP head scores every token of each tapped
    layer. Gradients still flow through the frozen backbone to the images."""

    TIMM_NAME = "vit_small_patch8_224.dino"
    TAPS = (2, 5, 8, 11)  # blocks whose tokens are scored, besides the final output

    def __init__(self, weights: str | None = None, random_init: bool = False) -> None:
        super().__init__()
        from rae_core.encoders import create_timm_model

        backbone, self.weights_label, _ = create_timm_model(
            self.TIMM_NAME, weights, random_init, "decoder.gan.disc_weights", num_classes=0)
        self.backbone = backbone.requires_grad_(False).eval()
        cfg, dim = backbone.pretrained_cfg, backbone.embed_dim
        self.input_size = cfg["input_size"][-1]
        self.register_buffer("pixel_mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg["std"]).view(1, 3, 1, 1),
                             persistent=False)
        self.heads = nn.ModuleList(
            nn.Sequential(spectral_norm(nn.Linear(dim, dim)), nn.LeakyReLU(0.2),
                          spectral_norm(nn.Linear(dim, 1)))
            for _ in range(len(self.TAPS) + 1))

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic",
                          align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        final, taps = self.backbone.forward_intermediates(
            x, indices=list(self.TAPS), output_fmt="NLC")  # taps: patch tokens (B, N, D)
        feats = [*taps, final[:, self.backbone.num_prefix_tokens:]]
        logits = [head(f).squeeze(-1) for head, f in zip(self.heads, feats, strict=True)]
        return torch.cat(logits, dim=1)  # (B, 5 * N)


def build_discriminator(kind: Literal["small", "dino"], weights: str | None = None,
                        random_init: bool = False) -> nn.Module:
    if kind == "small":
        if weights is not None:
            raise ConfigError("decoder.gan.disc_weights applies only to decoder.gan.disc = dino")
        return SmallDiscriminator()
    if kind == "dino":
        return DinoDiscriminator(weights, random_init)
    raise ValueError(f"unknown discriminator {kind!r}; valid: 'small', 'dino'")
