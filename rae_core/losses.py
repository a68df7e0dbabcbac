"""Decoder losses: LPIPS (VGG), the hinge GAN losses, the adaptive GAN weight and DiffAug."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rae_core.errors import WeightsMissingError
from rae_core.train.sampler import per_sample

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, as lpips would download it
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # lpips' split of vgg.features


def _vgg_weights_file(weights: str | None) -> Path:
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsMissingError(f"{path}: VGG16 weights for LPIPS not found; set "
                                      "decoder.lpips_weights to a torchvision vgg16 state dict")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not path.is_file():
        raise WeightsMissingError(f"LPIPS needs VGG16 weights: set decoder.lpips_weights to a "
                                  f"torchvision vgg16 state dict (or place {path})")
    return path


class LPIPSLoss(nn.Module):
    """Frozen LPIPS-VGG distance per sample, for images in [0, 1] (mapped to [-1, 1] inside).

    The backbone comes from a local torchvision vgg16 state dict, never a download;
    `pretrained_backbone=False` keeps it random (tests only: such a distance means little).
    """

    def __init__(self, weights: str | None = None, pretrained_backbone: bool = True) -> None:
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # torchvision's deprecation notice for `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if pretrained_backbone:
            path = _vgg_weights_file(weights)
            state = torch.load(path, map_location="cpu", weights_only=True)
            slices = {}
            for key, value in state.items():
                if key.startswith("features."):
                    idx = int(key.split(".")[1])
                    k = next(i for i, (a, b) in enumerate(_VGG_SLICES, 1) if a <= idx < b)
                    slices[f"slice{k}.{key.removeprefix('features.')}"] = value
            self.lpips.net.load_state_dict(slices)
            log.info("LPIPS: VGG16 backbone from %s", path)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        # Always eval: lpips' linear heads sit behind dropout layers.
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, 3, H, W) x 2 in [0, 1] -> distances (B,)."""
        return self.lpips(x, y, normalize=True).flatten()


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """0.5 * (E relu(1 - D(real)) + E relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer_weight: Tensor,
                        max_weight: float = 1e4, average=None) -> Tensor:
    """lambda = ||grad_W L_rec|| / (||grad_W L_gan|| + 1e-6), clamped to [0, max_weight] and
    detached; W is the decoder's last layer. Norms in fp32, outside autocast. `average` maps a
    rank's gradient to the global batch's (the mean over data-parallel ranks), so that every
    rank weighs the GAN loss alike."""
    with torch.autocast(device_type=last_layer_weight.device.type, enabled=False):
        g_rec = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
        g_gan = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
        if average is not None:
            g_rec, g_gan = average(g_rec), average(g_gan)
        weight = g_rec.float().norm() / (g_gan.float().norm() + 1e-6)
    return weight.clamp(0.0, max_weight).detach()


def diff_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Differentiable augmentation (DiffAug): brightness, saturation, contrast, then a random
    translation by up to 1/8 of the image with zero padding. Apply to real and fake alike."""
    b, _, h, w = x.shape

    def rand(*shape: int) -> Tensor:  # drawn on the CPU so one generator serves any device
        return per_sample(generator, b, lambda m, g: torch.rand(m, *shape, generator=g)
                          ).to(x.device, x.dtype)

    def shift(s: int) -> Tensor:
        return per_sample(generator, b, lambda m, g: torch.randint(-s, s + 1, (m, 1), generator=g)
                          ).to(x.device)

    x = x + (rand(1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand(1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand(1, 1, 1) + 0.5) + mean  # contrast
    sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    dy, dx = shift(sy), shift(sx)  # (B, 1) each
    rows = torch.arange(h, device=x.device) + sy - dy  # (B, H) source rows in the padded image
    cols = torch.arange(w, device=x.device) + sx - dx  # (B, W)
    padded = F.pad(x, (sx, sx, sy, sy))
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
