"""Frozen representation encoders: images (B, 3, R, R) in [0, 1] -> latents (B, C, H, W).

The latent is the encoder's last hidden state with the final LayerNorm's scale and shift removed
(plain normalisation) and its prefix tokens (CLS, registers) dropped. Images are resized
bicubically to the encoder's input size (256 -> 224 for patch-14 DINOv2, so the grid stays
16 x 16) and normalised with the encoder's own mean/std.

Also here: `LatentStats`, the exact per-element latent statistics used to normalise latents for
the diffusion model, keyed by the encoder's identity.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rae_core.decoder import Block, ViTDecoder, init_vit_weights, sincos_pos_embed_2d
from rae_core.errors import ConfigError, DataError, RaeError, WeightsMissingError
from rae_core.train.sampler import per_sample

log = logging.getLogger(__name__)

STATS_EPS = 1e-5  # z <- (z - mean) / sqrt(var + eps)


@dataclass(frozen=True)
class EncoderSpec:
    kind: Literal["timm", "pixels", "mae"]
    description: str
    timm_name: str | None = None
    timm_patch: int = 16  # the token grid is R/16; patch-14 models run at (R/16)*14 px
    options: dict[str, Any] = field(default_factory=dict)  # defaults of the allowed overrides


_MAE_SMALL = dict(patch=8, width=64, depth=4, heads=4, decoder_width=64, decoder_depth=2)

ENCODERS: dict[str, EncoderSpec] = {
    "dinov2-b": EncoderSpec("timm", "DINOv2-B/14 with 4 registers",
                            "vit_base_patch14_reg4_dinov2.lvd142m", timm_patch=14),
    "siglip2-b": EncoderSpec("timm", "SigLIP2-B/16", "vit_base_patch16_siglip_256.v2_webli"),
    "mae-b": EncoderSpec("timm", "MAE-B/16 (pos-embed interpolated to R)",
                         "vit_base_patch16_224.mae"),
    "pixels": EncoderSpec("pixels", "patchified pixels (patch 8 below 128 px, else 16)",
                          options=dict(patch=None)),
    "mae-tiny": EncoderSpec("mae", "small MAE pretrained by the platform", options=_MAE_SMALL),
    "mae-micro": EncoderSpec("mae", "smaller MAE for smoke runs",
                             options={**_MAE_SMALL, "depth": 2, "decoder_depth": 1}),
    # a 256-channel latent: wide for the generator widths a CPU budget affords (ablation d)
    "mae-tiny-256": EncoderSpec("mae", "small MAE with a 256-channel latent",
                                options={**_MAE_SMALL, "width": 256}),
}


# the architecture settings of a timm ViT that an untrained encoder may replace (shrunk tests)
TIMM_ARCH = ("depth", "embed_dim", "num_heads")


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the whole file: two fine-tunes of one model (SD-VAE ft-EMA and ft-MSE) differ
    only in tensors far from the start. About a second for a 1 GB file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_cache_dir() -> Path:
    # Read at call time (not at huggingface_hub import) so tests and users can redirect it.
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def create_timm_model(timm_name: str, weights: str | None, random_init: bool, setting: str,
                      **kwargs: Any) -> tuple[nn.Module, str, str | None]:
    """A timm model with local weights only: `weights` (a file), else the Hugging Face cache.
    Returns (model, weights label, sha256 of the weights file)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    if random_init:
        # seeded: every process that builds it (stats, extract, training, sampling) holds the
        # same weights, so the latents of one image never depend on which process encoded it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
        arch = "".join(f" {k}={v}" for k, v in kwargs.items() if k in TIMM_ARCH)
        return model, "random" + arch, None
    if weights is not None:
        path, label = Path(weights).expanduser(), Path(weights).name
        if not path.is_file():
            raise WeightsMissingError(f"{path}: weights file for {timm_name} not found; set "
                                      f"{setting} to an existing local file")
    else:
        repo = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
        cache = _hub_cache_dir()
        found = [try_to_load_from_cache(repo, f, cache_dir=cache)
                 for f in ("model.safetensors", "pytorch_model.bin")]
        found = [f for f in found if isinstance(f, str)]
        if not found:
            raise WeightsMissingError(f"no weights for {timm_name}: set {setting} to a local "
                                      f"weights file, or place {repo} in the hub cache {cache}")
        path, label = Path(found[0]), "hub"
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network, even by accident
    log.info("loading %s weights from %s", timm_name, path)
    try:
        model = timm.create_model(timm_name, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as e:  # any unreadable or mismatched file: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RaeError(f"{path}: not usable as {timm_name} weights ({first})") from e
    return model, label, file_fingerprint(path)


class Encoder(nn.Module):
    """A frozen encoder. Subclasses map normalised pixels to plain-normalised patch tokens."""

    has_exact_inverse: bool = False

    def __init__(self, name: str, resolution: int, input_size: int,
                 latent_shape: tuple[int, int, int], pixel_mean: tuple[float, float, float],
                 pixel_std: tuple[float, float, float]) -> None:
        super().__init__()
        self.name, self.resolution, self.input_size = name, resolution, input_size
        self.latent_shape = tuple(latent_shape)
        self.pixel_mean = tuple(float(m) for m in pixel_mean)
        self.pixel_std = tuple(float(s) for s in pixel_std)
        self.weights_label, self.weights_sha256 = "random", None
        self.register_buffer("_mean", torch.tensor(self.pixel_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("_std", torch.tensor(self.pixel_std).view(1, 3, 1, 1),
                             persistent=False)

    def tokens(self, x: Tensor) -> Tensor:
        """Normalised pixels (B, 3, S, S) -> patch tokens (B, H*W, C)."""
        raise NotImplementedError

    def prepare(self, images: Tensor) -> Tensor:
        """[0, 1] images at the working resolution -> the encoder's normalised input."""
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"encoder {self.name} expects {self.resolution} px images, "
                             f"got {tuple(images.shape[-2:])}")
        if self.input_size != self.resolution:
            images = F.interpolate(images, size=(self.input_size, self.input_size),
                                   mode="bicubic", align_corners=False, antialias=True)
        return (images - self._mean) / self._std

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, R, R) in [0, 1] -> latents (B, C, H, W)."""
        c, h, w = self.latent_shape
        return self.tokens(self.prepare(images)).transpose(1, 2).reshape(-1, c, h, w)

    def identity(self) -> dict[str, Any]:
        """What latents (and hence their statistics) depend on."""
        return {"name": self.name, "resolution": self.resolution, "weights": self.weights_label,
                "weights_sha256": self.weights_sha256, "latent_shape": list(self.latent_shape)}


class TimmEncoder(Encoder):
    """DINOv2 / SigLIP2 / MAE ViT-B from timm; token grid R/16 x R/16."""

    def __init__(self, name: str, resolution: int, spec: EncoderSpec, weights: str | None,
                 random_init: bool, **arch: int) -> None:
        if resolution % 16:
            raise ConfigError(f"data.resolution = {resolution}; encoder {name} needs a "
                              "multiple of 16")
        grid = resolution // 16
        input_size = grid * spec.timm_patch
        model, label, sha = create_timm_model(spec.timm_name, weights, random_init,
                                              "encoder.weights", img_size=input_size, **arch)
        cfg = model.pretrained_cfg
        super().__init__(name, resolution, input_size, (model.embed_dim, grid, grid),
                         cfg["mean"], cfg["std"])
        self.weights_label, self.weights_sha256 = label, sha
        model.reset_classifier(0, "")  # no pooling head (drops SigLIP's attention pool)
        # Plain normalisation: keep the final LayerNorm's statistics, drop its scale and shift.
        model.norm = nn.LayerNorm(model.embed_dim, eps=model.norm.eps, elementwise_affine=False)
        self.model = model
        self.num_prefix_tokens = model.num_prefix_tokens

    def tokens(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)[:, self.num_prefix_tokens:]


def pixels_decode(latents: Tensor) -> Tensor:
    """Exact inverse of the `pixels` encoder: (B, 3*p*p, H, W) -> images (B, 3, H*p, W*p)."""
    patch = round((latents.shape[1] / 3) ** 0.5)
    return F.pixel_shuffle(latents, patch) * 0.5 + 0.5


class PixelEncoder(Encoder):
    """Patchified pixels, normalised with mean 0.5 and std 0.5: a baseline with no features."""

    has_exact_inverse = True

    def __init__(self, name: str, resolution: int, patch: int | None = None) -> None:
        patch = patch or (8 if resolution < 128 else 16)
        if resolution % patch:
            raise ConfigError(f"data.resolution = {resolution} is not a multiple of the "
                              f"{name} patch {patch}")
        grid = resolution // patch
        super().__init__(name, resolution, resolution, (3 * patch * patch, grid, grid),
                         (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.patch = patch
        self.weights_label = "none"

    def tokens(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.patch).flatten(2).transpose(1, 2)

    def decode(self, latents: Tensor) -> Tensor:
        return pixels_decode(latents)


class TinyMAE(Encoder):
    """A small MAE (ViT encoder with CLS + light pixel decoder) that the platform pretrains.

    As an encoder it runs unmasked and unshuffled; the pixel decoder serves `mae_loss` only.
    """

    def __init__(self, name: str, resolution: int, patch: int, width: int, depth: int,
                 heads: int, decoder_width: int, decoder_depth: int) -> None:
        if resolution % patch:
            raise ConfigError(f"data.resolution = {resolution} is not a multiple of the "
                              f"{name} patch {patch}")
        grid = resolution // patch
        super().__init__(name, resolution, resolution, (width, grid, grid),
                         (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.patch = patch
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid).unsqueeze(0),
                             persistent=False)  # (1, N, D); CLS carries no position
        self.blocks = nn.ModuleList(Block(width, heads, 4 * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        # Masked positions enter the pixel decoder as a learned token in encoder-width space.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pixel_decoder = ViTDecoder(width, grid, patch, decoder_width, decoder_depth, heads,
                                        4 * decoder_width)
        self.apply(init_vit_weights)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer, like MAE
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def _hidden(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Normalised pixels -> last hidden state (B, 1+n, D) of the kept patches (all if None)."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        if keep is not None:
            t = t.gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        for block in self.blocks:
            t = block(t)
        return t

    def tokens(self, x: Tensor) -> Tensor:
        t = self._hidden(x)[:, 1:]
        return F.layer_norm(t, t.shape[-1:], eps=self.norm.eps)  # the norm without its affine

    def mae_loss(self, images: Tensor, mask_ratio: float = 0.75,
                 generator: torch.Generator | None = None) -> Tensor:
        """MAE objective: MSE of per-patch normalised pixels on the masked patches."""
        x = self.prepare(images)
        b, n, d = x.shape[0], self.pos_embed.shape[1], self.latent_shape[0]
        n_keep = max(1, int(n * (1 - mask_ratio)))
        noise = per_sample(generator, b, lambda m, g: torch.rand(m, n, generator=g)).to(x.device)
        keep = noise.argsort(dim=1)[:, :n_keep]  # a random subset per sample
        visible = self.norm(self._hidden(x, keep))[:, 1:]  # (B, n_keep, D)
        full = self.mask_token.expand(b, n, d).scatter(1, keep.unsqueeze(-1).expand(-1, -1, d),
                                                       visible)
        g = self.latent_shape[1]
        pred = self.pixel_decoder(full.transpose(1, 2).reshape(b, d, g, g))  # (B, 3, R, R)
        pred = F.pixel_unshuffle(pred, self.patch).flatten(2).transpose(1, 2)  # (B, N, 3pp)
        target = F.pixel_unshuffle(x, self.patch).flatten(2).transpose(1, 2)
        target = (target - target.mean(-1, keepdim=True)) / (
            target.var(-1, keepdim=True) + 1e-6).sqrt()
        err = ((pred - target) ** 2).mean(-1)  # (B, N)
        masked = torch.ones_like(err).scatter(1, keep, 0.0)
        if n_keep == n:  # nothing masked (ratio 0): plain autoencoding of every patch
            masked = torch.ones_like(err)
        return (err * masked).sum() / masked.sum()


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        close = difflib.get_close_matches(name, ENCODERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown encoder {name!r}{hint}; valid: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def build_encoder(name: str, resolution: int, weights: str | None = None,
                  random_init: bool = False, **overrides: Any) -> Encoder:
    """A frozen encoder in eval mode. `weights`: a local file; None = the Hugging Face cache for
    the timm encoders (never downloaded). `random_init` builds untrained weights (tests, the
    rehearsal preset), whose timm architecture `overrides` may then shrink (TIMM_ARCH)."""
    spec = _spec(name)
    valid = (*spec.options, *(TIMM_ARCH if spec.kind == "timm" and random_init else ()))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"encoder {name} has no setting {unknown[0]!r}; valid: "
                          f"{', '.join(valid) or 'none'}")
    options = {**spec.options, **overrides}
    if spec.kind == "timm":
        enc: Encoder = TimmEncoder(name, resolution, spec, weights, random_init, **overrides)
    elif spec.kind == "pixels":
        enc = PixelEncoder(name, resolution, **options)
    else:
        enc = TinyMAE(name, resolution, **options)
        if not random_init:
            if weights is None:
                raise WeightsMissingError(f"encoder {name} has no weights: set encoder.weights "
                                          "to the file `rae stage pretrain-encoder` writes")
            path = Path(weights).expanduser()
            if not path.is_file():
                raise WeightsMissingError(f"{path}: {name} weights file not found; set "
                                          "encoder.weights or run `rae stage pretrain-encoder`")
            try:
                enc.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except RuntimeError as e:
                raise RaeError(f"{path}: not a state dict of this {name} "
                               f"({str(e).strip().splitlines()[0]})") from e
            enc.weights_label, enc.weights_sha256 = path.name, file_fingerprint(path)
    return enc.requires_grad_(False).eval()


class LatentStats:
    """Exact streaming per-element mean and population variance of latents of shape (C, H, W).

    Each shard keeps (count, mean, M2) in float64; shards merge exactly with Chan et al.'s
    parallel update, so the result does not depend on how the data was split.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.count = 0
        self._mean = torch.zeros(self.shape, dtype=torch.float64)
        self._m2 = torch.zeros(self.shape, dtype=torch.float64)

    def _combine(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def update(self, latents: Tensor) -> None:
        """Add a batch (B, C, H, W)."""
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"latents of shape {tuple(latents.shape[1:])} do not match the "
                             f"statistics' shape {self.shape}")
        x = latents.detach().to(torch.float64)  # reduce on the latents' device, keep on CPU
        mean = x.mean(0)
        self._combine(len(x), mean.cpu(), (x - mean).square().sum(0).cpu())

    def merge(self, other: LatentStats) -> None:
        if other.shape != self.shape:
            raise ValueError(f"cannot merge statistics of shape {other.shape} into {self.shape}")
        self._combine(other.count, other._mean, other._m2)

    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def var(self) -> Tensor:
        if self.count == 0:
            raise RaeError("latent statistics are empty: no latents were added")
        return self._m2 / self.count

    def global_std(self) -> float:
        """The standard deviation of all latent values pooled (law of total variance)."""
        pooled_mean = self._mean.mean()
        return float((self.var + (self._mean - pooled_mean).square()).mean().sqrt())

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self._mean.to(z)) / (self.var + STATS_EPS).sqrt().to(z)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * (self.var + STATS_EPS).sqrt().to(z) + self._mean.to(z)

    def state_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "count": self.count, "mean": self._mean,
                "m2": self._m2}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LatentStats:
        stats = cls(tuple(state["shape"]))
        stats.count = int(state["count"])
        stats._mean = state["mean"].to(torch.float64).cpu()
        stats._m2 = state["m2"].to(torch.float64).cpu()
        return stats

    def save(self, path: str | Path, identity: dict[str, Any]) -> None:
        """Write atomically, with the checksum `load` verifies."""
        from rae_core.store import atomic_save

        atomic_save({"identity": identity, "stats": self.state_dict()}, path, checksum=True)

    @classmethod
    def load(cls, path: str | Path, expected_identity: dict[str, Any]) -> LatentStats:
        """Load statistics, refusing those computed for another encoder/resolution/shape."""
        from rae_core.store import safe_load, verify

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: latent statistics not found; run `rae stage stats` first")
        hint = "re-make it with `rae stage stats --force`"
        verify(path, hint)  # a damaged file fails here in one line, never as a bare traceback
        payload = safe_load(path, hint)
        saved, expected = _canonical(payload["identity"]), _canonical(expected_identity)
        if saved != expected:
            raise RaeError(f"{path}: statistics were computed for {saved}, but the current "
                           f"setup is {expected}; recompute them with `rae stage stats`")
        return cls.from_state_dict(payload["stats"])


class LatentScale:
    """A VAE's latent normalisation, as in latent diffusion: one scale for every value and no
    mean shift (SD-VAE: 0.18215; a VAE trained here: 1 / the measured pooled std)."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def normalize(self, z: Tensor) -> Tensor:
        return z * self.scale

    def denormalize(self, z: Tensor) -> Tensor:
        return z / self.scale


def _canonical(identity: dict[str, Any]) -> str:
    """Order- and tuple/list-insensitive form of an identity, for comparison and messages."""
    return json.dumps(identity, sort_keys=True, default=str)
