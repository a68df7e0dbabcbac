"""The registered generator as a self-contained MLflow pyfunc model, and `rae sample`.

The logged model holds the files the sample stage reads, at the paths it reads them from
(models/generator/ema.pt, the decoder, the encoder it is built from, the latent statistics),
plus the resolved configuration, so `load_context` rebuilds everything with the stage's own
loaders (rae_core.autoencoder, rae_core.generator) from a `Paths` rooted in the artifacts. It is
logged as code (flows/generator_entry.py), so loading it unpickles nothing but weights.

`predict` takes one row per image: `class_label`, and optionally `seed` and `guidance` (the
scale; defaults: the configuration's sample.seed and sample.scale). Rows sharing a seed and a
scale are drawn as the sample stage draws its first shard with that sample.seed, so the sample
stage's first shard of labels comes back image for image.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from rae_core.config import Config, from_dict, merge
from rae_core.errors import ConfigError
from rae_core.paths import Paths

ENTRY = Path(__file__).with_name("generator_entry.py")
# settings that name files, possibly outside the project (relative: to the project root);
# what they name travels under external/<section>.<key>/ and they are pointed there on loading
EXTERNAL = (("encoder", "weights"), ("autoencoder", "config"), ("sample", "weak_model"))


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from rae_core.autoencoder import load_decoder, load_encoder, load_stats
        from rae_core.generator import load_generator

        root = Path(context.artifacts["project"])
        data = json.loads(Path(context.artifacts["config"]).read_text())
        for section, key in EXTERNAL:
            if value := data[section][key]:
                copied = root / "external" / f"{section}.{key}" / Path(value).name
                data[section][key] = str(copied) if copied.exists() else value
        self.data, self.cfg, paths = data, from_dict(data), Paths.at(root)
        encoder = load_encoder(self.cfg, paths)
        self.stats = load_stats(self.cfg, paths, encoder)
        self.decoder = load_decoder(self.cfg, paths, encoder)
        self.shape = tuple(encoder.latent_shape)
        n = self.cfg.data.num_classes
        self.model = load_generator(paths.generator_dir / "ema.pt", self.shape, n)
        self.weak = load_generator(paths.dataset(self.cfg.sample.weak_model), self.shape, n) \
            if self.cfg.sample.guidance == "autoguidance" else None

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        s = self.cfg.sample
        rows = model_input.reset_index(drop=True)
        labels = rows["class_label"].astype(int).to_numpy()
        if len(labels) and not 0 <= labels.min() <= labels.max() < self.cfg.data.num_classes:
            bad = labels[(labels < 0) | (labels >= self.cfg.data.num_classes)][0]
            raise ConfigError(f"class_label {bad}: out of range (valid: 0-"
                              f"{self.cfg.data.num_classes - 1})")
        seeds = rows["seed"].astype(int) if "seed" in rows else np.full(len(rows), s.seed)
        scales = rows["guidance"].astype(float) if "guidance" in rows \
            else np.full(len(rows), s.scale)
        r = self.cfg.data.resolution
        out = np.zeros((len(rows), r, r, 3), dtype=np.uint8)
        for (seed, scale), group in rows.groupby([np.asarray(seeds), np.asarray(scales)],
                                                 sort=False).groups.items():
            idx = np.asarray(group)
            out[idx] = self._draw(labels[idx].tolist(), int(seed), float(scale))
        return out

    def _draw(self, labels: list[int], seed: int, scale: float) -> np.ndarray:
        """The sample stage's shard 0 (rae_core.generate._shard) for these labels, with
        sample.seed = seed and sample.scale = scale."""
        from rae_core.generate import draw_images

        cfg = from_dict(merge(self.data, {"sample": {"seed": seed, "scale": scale}}))
        return draw_images(cfg, 0, labels, self.model, self.decoder, self.stats, self.shape,
                           self.weak)


def _decoding_files(cfg: Config, paths: Paths) -> list[Path]:
    """What the sample stage reads under the project root to go from labels to images."""
    from rae_core.autoencoder import encoder_weights, needs_pretraining
    from rae_core.vae import pretrained_dir

    files = [paths.generator_dir / "ema.pt", paths.decoder_dir / "decoder.pt"]
    if paths.stats_file.exists():  # hybrid-vq samples without it
        files.append(paths.stats_file)
    if needs_pretraining(cfg):  # the encoder pretrain-encoder wrote: the decoder is built on it
        files.append(pretrained_dir(paths) if cfg.autoencoder.kind == "vae"
                     else Path(encoder_weights(cfg, paths)))
    return files


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def log_generator(cfg: Config, paths: Paths, registered_name: str):
    """Log the generator with everything it decodes with to the active run and register it
    under `registered_name`; returns MLflow's ModelInfo."""
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    r, s = cfg.data.resolution, cfg.sample
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "class_label"), ColSpec("long", "seed", required=False),
                       ColSpec("double", "guidance", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, r, r, 3))]))
    example = pd.DataFrame({"class_label": [0, 1 % cfg.data.num_classes],
                            "seed": [s.seed, s.seed], "guidance": [s.scale, s.scale]})
    with tempfile.TemporaryDirectory() as tmp:
        project, config = Path(tmp) / "project", Path(tmp) / "config.json"
        for f in _decoding_files(cfg, paths):
            _copy(f, project / f.relative_to(paths.root))
        for section, key in EXTERNAL:
            value = getattr(getattr(cfg, section), key)
            # an unused weak_model may name no file; a used file's absence failed earlier
            if value is not None and paths.dataset(value).exists():
                _copy(paths.dataset(value),
                      project / "external" / f"{section}.{key}" / Path(value).name)
        config.write_text(json.dumps(cfg.to_dict(), indent=1))
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(ENTRY),
            artifacts={"project": str(project), "config": str(config)},
            signature=signature, input_example=example,
            registered_model_name=registered_name,
            metadata={"num_classes": cfg.data.num_classes, "resolution": r,
                      "preset": cfg.preset},
            # given, not inferred: inference would load and run the model in a subprocess
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
                              f"rae-platform=={_version()}"])


def _version() -> str:
    from importlib.metadata import version

    return version("rae-platform")


def sample_folder(uri: str, classes: str | None, n: int, out: Path, seed: int | None = None,
                  guidance: float | None = None) -> str:
    """`rae sample`: n images from the model at `uri`, round-robin over `classes` ("3,7"; all
    when None), as out/<index>-class<label>.png and out/grid.png; returns the line to print."""
    from rae_core.images import grid, save_png

    if n < 1:
        raise ConfigError(f"--n {n}: must be at least 1")
    num = int(_model_info(uri).metadata["num_classes"])
    labels = _parse_classes(classes, num)
    picked = [labels[i % len(labels)] for i in range(n)]
    rows = pd.DataFrame({"class_label": picked})
    if seed is not None:
        rows["seed"] = seed
    if guidance is not None:
        rows["guidance"] = float(guidance)
    images = mlflow.pyfunc.load_model(uri).predict(rows)
    width = len(str(n - 1))
    for i, (image, y) in enumerate(zip(images, picked, strict=True)):
        save_png(image, out / f"{i:0{width}d}-class{y}.png")
    save_png(grid(images, nrow=min(n, len(labels))), out / "grid.png")
    h, w = images.shape[1:3]
    return (f"wrote {n} {h}x{w} images of class{'es' if len(labels) > 1 else ''} "
            f"{','.join(map(str, labels))} and grid.png to {out} (from {uri})")


def _parse_classes(classes: str | None, num_classes: int) -> list[int]:
    if classes is None:
        return list(range(num_classes))
    valid = f"valid: integers 0-{num_classes - 1}, comma-separated"
    labels = []
    for part in classes.split(","):
        try:
            label = int(part)
        except ValueError:
            raise ConfigError(f"--classes {classes}: {part.strip()!r} is not a class label "
                              f"({valid})") from None
        if not 0 <= label < num_classes:
            raise ConfigError(f"--classes {classes}: class {label} does not exist ({valid})")
        labels.append(label)
    return labels


def _model_info(uri: str):
    """The logged model's MLmodel (no weights downloaded), or a ConfigError saying what exists."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        client = MlflowClient()
        names = sorted(m.name for m in client.search_registered_models())
        name = uri.removeprefix("models:/").split("/")[0].split("@")[0]
        if uri.startswith("models:/") and name in names:
            model = client.get_registered_model(name)
            versions = sorted(int(v.version) for v in client.search_model_versions(
                f"name = '{name}'"))
            valid = (f"versions of {name}: {', '.join(map(str, versions))}; aliases: "
                     f"{', '.join(sorted(model.aliases)) or 'none'}")
        else:
            valid = (f"registered models: {', '.join(names) or 'none'}, as "
                     "models:/NAME/VERSION or models:/NAME@ALIAS")
        raise ConfigError(f"--model {uri}: {reason} ({valid})") from None
