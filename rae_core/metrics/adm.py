"""ADM's reference batches (guided-diffusion's evaluator), the reference set of the paper's
ImageNet table: a .npz with the batch's uint8 images `arr_0` (N, H, W, 3), and/or the
statistics of Inception's pool_3 features `mu`, `sigma` (and spatial ones `mu_s`, `sigma_s`
for sFID, which this platform does not compute).

FID is taken against the stored `mu`, `sigma` when the file has them (as ADM's evaluator
does), else against the statistics of the batch's images. Precision/recall needs the images'
features: without `arr_0` it is not computed. The stored statistics come from ADM's TensorFlow
graph, which resizes to 299 px bilinearly inside the network; this platform's Inception
(clean-fid's port of the same 2015-12-05 network) resizes with PIL bicubic, so a FID against
stored statistics differs from ADM's own by that resize alone, one against `arr_0` not at all.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from rae_core.errors import DataError
from rae_core.metrics.fid import FeatureStats, StatsAccumulator

log = logging.getLogger(__name__)

IMAGES, STATS, SPATIAL = "arr_0", ("mu", "sigma"), ("mu_s", "sigma_s")
POOL_DIM = 2048
CHUNK = 500  # images through the extractor at once


def protocol_name(path: str | Path, stored: bool) -> str:
    """The reference set as the leaderboard names it: the batch file, and whether FID used its
    stored statistics (ADM's protocol) or its images."""
    return f"adm:{Path(path).name}" + (":stored-stats" if stored else "")


def layout(path: str | Path, key: str = "evaluate.reference") -> tuple[bool, bool]:
    """(has images, has stored statistics) of a reference batch; a file that is missing, or has
    neither, or half of a pair, or arrays of the wrong shape fails in one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: ADM reference batch {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            has_images = IMAGES in keys
            if has_images and (z[IMAGES].dtype != np.uint8 or z[IMAGES].ndim != 4
                               or z[IMAGES].shape[-1] != 3):
                raise DataError(f"{key}: {path}: {IMAGES} must be uint8 (N, H, W, 3) images, "
                                f"got {z[IMAGES].dtype} {z[IMAGES].shape}")
            present = [k for k in STATS if k in keys]
            if len(present) == 1:
                missing = next(k for k in STATS if k not in keys)
                raise DataError(f"{key}: {path} has {present[0]} but no {missing!r}")
            has_stats = len(present) == 2
            if has_stats and (z["mu"].shape != (POOL_DIM,)
                              or z["sigma"].shape != (POOL_DIM, POOL_DIM)):
                raise DataError(f"{key}: {path}: mu, sigma must be pool_3 statistics "
                                f"({POOL_DIM},), ({POOL_DIM}, {POOL_DIM}); got "
                                f"{z['mu'].shape}, {z['sigma'].shape}")
    except (OSError, ValueError) as e:
        raise DataError(f"{key}: {path} is not a readable .npz ({e})") from e
    if not (has_images or has_stats):
        raise DataError(f"{key}: {path} has neither {IMAGES!r} (images) nor 'mu'/'sigma' "
                        f"(statistics); keys: {', '.join(sorted(keys)) or 'none'}")
    return has_images, has_stats


def _cache_name(path: Path, extractor_name: str) -> str:
    st = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = extractor_name.replace(":", "-").replace("/", "-")
    return f"adm-{path.stem}-{name}-{ident.hexdigest()[:12]}.npz"


def image_features(path: str | Path, extractor, cache_dir: str | Path) -> np.ndarray:
    """Features of the batch's images, computed once per (file, extractor) and cached."""
    path = Path(path).expanduser()
    cache = Path(cache_dir) / _cache_name(path, extractor.name)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return z["features"]
    with np.load(path, allow_pickle=False) as z:
        images = z[IMAGES]
    log.info("ADM reference batch %s: %d images through %s", path.name, len(images),
             extractor.name)
    feats = np.concatenate([extractor(images[i: i + CHUNK])
                            for i in range(0, len(images), CHUNK)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    with open(tmp, "wb") as f:  # a file object stops numpy from appending ".npz"
        np.savez(f, features=feats)
    tmp.replace(cache)
    return feats


def read_reference(path: str | Path, extractor, cache_dir: str | Path,
                   key: str = "evaluate.reference") -> tuple[FeatureStats, np.ndarray | None, str]:
    """(FID statistics, precision/recall features or None, protocol name) of a batch file."""
    path = Path(path).expanduser()
    has_images, has_stats = layout(path, key)
    feats = image_features(path, extractor, cache_dir) if has_images else None
    if has_stats:
        with np.load(path, allow_pickle=False) as z:
            if any(k in z.files for k in SPATIAL):
                log.info("%s: spatial statistics (sFID) present but not used", path.name)
            # the stored pool_3 statistics, in the feature space our Inception shares with them
            stats = FeatureStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64),
                                 0 if feats is None else len(feats), extractor.name)
    else:
        stats = StatsAccumulator(extractor.name).update(feats).stats()
    if feats is None:
        log.warning("%s: precision/recall needs the batch's images (%s), which the file "
                    "lacks: not computed", path.name, IMAGES)
    return stats, feats, protocol_name(path, has_stats)
