"""JPEG decoding on the GPU for extract (extract.gpu_decode), cropped as the CPU path crops.

Loader workers only read a JPEG's bytes; the training process decodes a batch of them with
nvJPEG (torchvision.io.decode_jpeg) and applies ADM's centre crop as tensor maths that
reproduce PIL's resampling (rae_core.data.folder.center_crop_adm): the same filters (BOX while
halving, then bicubic with a = -0.5, widened when downscaling), the same pixel windows,
horizontal pass first and rounding to uint8 after each pass. Files nvJPEG cannot take (PNGs,
CMYK or other JPEG modes) are decoded in the worker by the CPU path itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from rae_core.data.folder import load_image
from rae_core.errors import ConfigError, DataError


def read_encoded(path: Path, size: int) -> tuple[torch.Tensor, bool]:
    """What a worker reads of one image: (the file's bytes uint8 (n,), True) for an RGB or
    greyscale JPEG, else (the CPU path's crop uint8 (3, size, size), False)."""
    try:
        with Image.open(path) as im:  # the header only
            jpeg = im.format == "JPEG" and im.mode in ("RGB", "L")
    except (OSError, ValueError):
        jpeg = False  # load_image names the file in its error
    if jpeg:
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), True
    return torch.from_numpy(load_image(path, size).copy()).permute(2, 0, 1), False


def _box(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).double()


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


FILTERS = {"box": (_box, 0.5), "bicubic": (_bicubic, 2.0)}  # kernel, support


def resample_weights(n_in: int, n_out: int, kind: str) -> torch.Tensor:
    """PIL's resampling coefficients as a matrix (n_out, n_in): output pixel i reads the input
    pixels within the filter's support around its centre, the support widened by the scale
    when downscaling (antialiasing), weights normalised to sum to 1."""
    kernel, support = FILTERS[kind]
    scale = n_in / n_out
    widen = max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale  # (n_out,)
    j = torch.arange(n_in, dtype=torch.float64)  # (n_in,)
    lo = (centre - support * widen + 0.5).floor().clamp(min=0)
    hi = (centre + support * widen + 0.5).floor().clamp(max=n_in)
    inside = (j >= lo[:, None]) & (j < hi[:, None])
    w = kernel((j[None] - centre[:, None] + 0.5) / widen) * inside  # (n_out, n_in)
    return w / w.sum(1, keepdim=True)


def _round(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.5).floor().clamp(0, 255)  # PIL rounds halves up and clips to uint8


def resize(image: torch.Tensor, height: int, width: int, kind: str) -> torch.Tensor:
    """Float (C, H, W) of uint8 values resized as PIL resizes an 8-bit image."""
    _, h, w = image.shape
    if width != w:
        image = _round(image @ resample_weights(w, width, kind).to(image).T)  # (C, H, width)
    if height != h:
        image = _round(resample_weights(h, height, kind).to(image) @ image)  # (C, height, W)
    return image


def center_crop_adm_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """ADM's centre crop of uint8 (3, H, W) on its device: uint8 (3, size, size)."""
    x = image.float()
    while min(x.shape[1:]) >= 2 * size:
        x = resize(x, x.shape[1] // 2, x.shape[2] // 2, "box")
    h, w = x.shape[1:]
    scale = size / min(h, w)
    x = resize(x, round(h * scale), round(w * scale), "bicubic")
    top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2
    return x[:, top: top + size, left: left + size].to(torch.uint8)


def decode_device(cfg) -> torch.device:
    """The run's GPU, which decodes; a one-line ConfigError where the run computes on the CPU
    (device.of names ray.use_gpu where a GPU was asked for but is not there)."""
    from rae_core import device

    target = device.of(cfg)
    if target.type != "cuda":
        raise ConfigError("extract.gpu_decode: true needs a CUDA device, but ray.use_gpu is "
                          "false; set ray.use_gpu=true on a machine with a GPU, or "
                          "extract.gpu_decode=false to decode on the CPU")
    return target


def decode_batch(items: list[torch.Tensor], encoded: list[bool], files: list[Path], size: int,
                 device: torch.device) -> torch.Tensor:
    """Images (n, 3, size, size) in [0, 1] on `device` from what read_encoded gave: the JPEGs
    decoded there in one batch and cropped, the others (already cropped) moved there."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [(t, f) for t, e, f in zip(items, encoded, files, strict=True) if e]
    try:
        decoded = iter(decode_jpeg([t for t, _ in jpegs], mode=ImageReadMode.RGB, device=device)
                       if jpegs else [])
    except RuntimeError:
        for t, f in jpegs:  # one at a time, to name the file
            try:
                decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                raise DataError(f"{f}: not a decodable JPEG ({e}); remove or replace the file, "
                                "or set extract.gpu_decode=false") from None
        raise
    out = [center_crop_adm_tensor(next(decoded), size) if e else t.to(device)
           for t, e in zip(items, encoded, strict=True)]
    return torch.stack(out).float().div_(255)  # (n, 3, size, size)
