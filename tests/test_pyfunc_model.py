"""The registered generator as an MLflow pyfunc model, and `rae sample`. The smoke preset's
models are built untrained (the files the stages write, in the project's layout), registered
the way the pipeline registers them after train-generator, and sampled from."""

import json
import logging
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flows import tracking
from flows.pipeline import _register_model, registered_name
from rae_core.paths import Paths
from rae_core.presets import load_config


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _write_untrained_models(cfg, paths):
    """The files pretrain-encoder, stats, train-decoder and train-generator write, untrained."""
    from rae_core import autoencoder as ae
    from rae_core.encoders import LatentStats, build_encoder
    from rae_core.generator import build_generator, checkpoint_meta, token_space

    torch.manual_seed(0)
    if cfg.autoencoder.kind == "vae":
        from rae_core.vae import build_vae, pretrained_dir, save_vae

        save_vae(build_vae(cfg.encoder.name), pretrained_dir(paths))
    elif cfg.autoencoder.kind == "hybrid-vq":
        from rae_core.hybrid_vq import HybridTokenizer, save_tokenizer

        save_tokenizer(HybridTokenizer(ae.tokenizer_config(cfg)), cfg.encoder.name,
                       paths.encoder_dir / "tokenizer.pt")
    else:
        paths.encoder_dir.mkdir(parents=True)
        mae = build_encoder(cfg.encoder.name, cfg.data.resolution, random_init=True)
        torch.save(mae.state_dict(), paths.encoder_dir / "encoder.pt")
    encoder = ae.load_encoder(cfg, paths)
    stats = LatentStats(tuple(encoder.latent_shape))
    stats.update(encoder.encode(torch.rand(8, 3, cfg.data.resolution, cfg.data.resolution)))
    stats.save(paths.stats_file, ae.stats_identity(cfg, encoder))
    paths.decoder_dir.mkdir(parents=True)
    decoder = ae.build_decoder_for(cfg, paths, encoder)
    torch.save({"model": decoder.state_dict()}, paths.decoder_dir / "decoder.pt")
    paths.generator_dir.mkdir(parents=True)
    model = build_generator(cfg, tuple(encoder.latent_shape), token_space(cfg, paths, encoder))
    torch.save({"model": model.state_dict(), "name": cfg.generator.model,
                "overrides": cfg.generator.overrides(), **checkpoint_meta(model)},
               paths.generator_dir / "ema.pt")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A smoke project whose generator is registered (with the champion alias) in the
    project's own SQLite store; the process's environment is restored afterwards."""
    import mlflow

    proj = tmp_path_factory.mktemp("pyfunc-project")
    cfg, paths = load_config(None, "smoke"), Paths.at(proj)
    _write_untrained_models(cfg, paths)
    saved_env, previous_uri = dict(os.environ), mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{proj / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        run_id = tracking.start_run(cfg, proj, "train-generator", tags={"rae.stage": "x"})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _register_model("train-generator", cfg, paths, run_id)
        name = registered_name(cfg, "generator")
        reg = json.loads((paths.generator_dir / "registered.json").read_text())
        tracking.client().set_registered_model_alias(name, "champion", reg["version"])
        yield {"proj": proj, "cfg": cfg, "paths": paths, "run_id": run_id, "name": name,
               "uri": f"models:/{name}/{reg['version']}", "reg": reg,
               # what a user sees: warnings other than deprecations (hidden by default)
               "said": records.lines + [str(w.message) for w in caught
                                        if not issubclass(w.category, DeprecationWarning)]}
    finally:
        logging.getLogger().removeHandler(records)
        mlflow.set_tracking_uri(previous_uri)
        os.environ.clear()
        os.environ.update(saved_env)


def test_the_model_is_registered_with_its_signature_example_and_run(registered):
    import mlflow

    r = registered
    assert r["reg"] == {"name": "rae-generator-digits-32", "version": "1"}
    client = tracking.client()
    version = client.get_model_version(r["name"], "1")
    assert version.tags["preset"] == "smoke" and version.tags["model"] == "DiTDH-micro"
    assert client.get_run(r["run_id"]).data.tags["rae.registered_version"] == "1"
    info = mlflow.models.get_model_info(r["uri"])
    assert [c.name for c in info.signature.inputs.inputs] == ["class_label", "seed", "guidance"]
    (out,) = info.signature.outputs.inputs
    assert out.type == np.dtype(np.uint8) and out.shape == (-1, 32, 32, 3)
    assert info.metadata["num_classes"] == 10
    outputs = client.get_run(r["run_id"]).outputs.model_outputs
    assert [o.model_id for o in outputs] == [info.model_id]  # the runs table's Models column
    local = mlflow.artifacts.download_artifacts(r["uri"])
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert list(example.columns) == ["class_label", "seed", "guidance"] and len(example) == 2
    assert not any(p.suffix == ".pkl" for p in __import__("pathlib").Path(local).rglob("*"))
    assert r["said"] == []  # no pickle warning, and the input example ran through the model


def test_images_are_the_sample_stages_for_the_same_labels_and_seed(registered, tmp_path):
    import mlflow

    from rae_core.generate import _shard
    from rae_core.sampling import balanced_labels

    r = registered
    cfg, s = r["cfg"], r["cfg"].sample
    labels = balanced_labels(s.num_per_class, cfg.data.num_classes)[: s.shard_size].tolist()
    _shard(cfg.to_dict(), str(r["proj"]), 0, labels, str(tmp_path / "shard.npz"))
    stage = np.load(tmp_path / "shard.npz")["images"]
    model = mlflow.pyfunc.load_model(r["uri"])
    rows = __import__("pandas").DataFrame({"class_label": labels})
    images = model.predict(rows.assign(seed=s.seed))
    assert images.dtype == np.uint8 and images.shape == (len(labels), 32, 32, 3)
    np.testing.assert_array_equal(images, stage)
    np.testing.assert_array_equal(model.predict(rows), images)  # seed defaults to sample.seed
    assert not np.array_equal(model.predict(rows.assign(seed=s.seed + 1)), images)


def test_rae_sample_writes_the_requested_images_and_a_grid(registered, monkeypatch, capsys):
    from flows.cli import main

    r = registered
    monkeypatch.chdir(r["proj"])
    for uri, out in ((f"models:/{r['name']}@champion", "champion"), (r["uri"], "version")):
        assert main(["sample", "--model", uri, "--classes", "3,7", "--n", "5",
                     "--out", out]) == 0
        written = sorted(p.name for p in (r["proj"] / out).iterdir())
        assert written == ["0-class3.png", "1-class7.png", "2-class3.png", "3-class7.png",
                           "4-class3.png", "grid.png"]
        assert all(Image.open(r["proj"] / out / f).size == (32, 32) for f in written[:-1])
        assert Image.open(r["proj"] / out / "grid.png").size == (2 + 2 * 34, 2 + 3 * 34)
        (line,) = capsys.readouterr().out.splitlines()
        assert line.startswith("wrote 5 32x32 images of classes 3,7 and grid.png to ")
    for name in ("0-class3.png", "1-class7.png"):  # same seed, same images, whatever the alias
        assert (np.asarray(Image.open(r["proj"] / "champion" / name)) ==
                np.asarray(Image.open(r["proj"] / "version" / name))).all()


def test_a_copy_of_the_model_folder_works_away_from_the_project(registered, tmp_path,
                                                                monkeypatch):
    import mlflow
    import pandas as pd

    r = registered
    folder = tmp_path / "elsewhere" / "model"
    shutil.move(mlflow.artifacts.download_artifacts(r["uri"], dst_path=str(tmp_path / "dl")),
                folder)
    rows = pd.DataFrame({"class_label": [1, 2], "seed": [5, 5], "guidance": [2.0, 2.0]})
    expected = mlflow.pyfunc.load_model(r["uri"]).predict(rows)
    models = r["proj"] / "models"
    models.rename(r["proj"] / "moved-away")  # nothing may be read from the project
    try:
        monkeypatch.chdir(tmp_path)
        np.testing.assert_array_equal(mlflow.pyfunc.load_model(str(folder)).predict(rows),
                                      expected)
    finally:
        (r["proj"] / "moved-away").rename(models)


@pytest.mark.parametrize("preset", ["smoke-vae", "smoke-hart"])
def test_every_family_registers_a_model_that_samples_as_its_sample_stage(
        preset, local_mlflow, tmp_path, monkeypatch):
    import pandas as pd

    from rae_core.generate import _shard

    mlflow = local_mlflow
    cfg = load_config(None, preset, ["sample.steps=2"])  # what is sampled matters, not how well
    paths = Paths.at(tmp_path / "project")
    _write_untrained_models(cfg, paths)
    run_id = tracking.start_run(cfg, paths.root, "train-generator")
    _register_model("train-generator", cfg, paths, run_id)
    labels = [3, 7, 3]
    _shard(cfg.to_dict(), str(paths.root), 0, labels, str(tmp_path / "shard.npz"))
    version = json.loads((paths.generator_dir / "registered.json").read_text())["version"]
    folder = mlflow.artifacts.download_artifacts(
        f"models:/{registered_name(cfg, 'generator')}/{version}", dst_path=str(tmp_path / "dl"))
    shutil.rmtree(paths.root)  # nothing may be read from the project
    monkeypatch.chdir(tmp_path)
    images = mlflow.pyfunc.load_model(folder).predict(pd.DataFrame({"class_label": labels}))
    np.testing.assert_array_equal(images, np.load(tmp_path / "shard.npz")["images"])


@pytest.mark.parametrize("args,names", [
    (["--model", "models:/nope@champion"], ["models:/nope@champion", "rae-generator-digits-32"]),
    (["--model", "models:/rae-generator-digits-32/7"], ["/7", "versions of", "1", "champion"]),
    (["--classes", "3,10"], ["class 10", "0-9"]),
    (["--classes", "3,x"], ["'x'", "0-9"]),
])
def test_a_bad_model_or_class_fails_with_one_line(registered, monkeypatch, capsys, tmp_path,
                                                 args, names):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    base = {"--model": f"models:/{registered['name']}@champion", "--out": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    assert main(["sample", *[x for kv in base.items() for x in kv]]) != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rae: error: ") and all(n in line for n in names), line
    assert not (tmp_path / "o").exists()
