"""Switching datasets and presets in one project folder, and running stages out of order: every
stage reads the data the configuration names, and an input another configuration made is
refused in one line before anything starts.

A folder of solid-colour images (classes red, green, blue) tells its images apart from the
digits' at a glance: by the class names, the pixel values and the number of images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows import services
from rae_core import provenance
from rae_core.data.folder import ImageFolderDataset
from rae_core.errors import DataError
from rae_core.paths import Paths
from rae_core.presets import load_config
from rae_core.stages import prepare

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
TRAIN, VAL = 4, 2  # images per class


def colour_folder(path: Path) -> Path:
    for split, n in (("train", TRAIN), ("val", VAL)):
        for name, rgb in COLOURS.items():
            (path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), rgb).save(path / split / name / f"{i}.png")
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*.png"))}


def folder_settings(source: Path) -> list[str]:
    return ["data.dataset=folder", f"data.source={source}", f"data.num_classes={len(COLOURS)}"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray: no dataset check on workers
    colours = colour_folder(tmp_path / "colours")
    proj = tmp_path / "project"
    proj.mkdir()
    return Paths.at(proj), colours


def _read(paths: Paths) -> tuple[dict, list[str], np.ndarray]:
    """What a stage reading data/dataset gets: prepare's summary, the training classes and the
    first training image."""
    root = paths.dataset("data/dataset")
    ds = ImageFolderDataset(root, "train", 32)
    return (json.loads((paths.root / "data" / "dataset.json").read_text()),
            list(ds.index.classes), ds[0][0].numpy())


def _no_leftovers(paths: Paths) -> None:
    assert sorted(p.name for p in (paths.root / "data").iterdir()) == ["dataset", "dataset.json"]


def test_prepare_switches_digits_and_a_folder_back_and_forth(project):
    paths, colours = project
    before = _files(colours)
    digits, folder = load_config(None, "smoke"), load_config(None, "smoke",
                                                             folder_settings(colours))
    root = paths.dataset("data/dataset")
    for _ in range(2):
        prepare(digits, paths)
        summary, classes, first = _read(paths)
        assert summary["source"] == "digits" and summary["train"] + summary["val"] == 1797
        assert classes == [str(c) for c in range(10)] and first.std() > 0.1  # ink on black
        assert not root.is_symlink()
        _no_leftovers(paths)
        prepare(folder, paths)
        summary, classes, first = _read(paths)
        assert summary["source"] == str(colours) and summary["train"] == TRAIN * len(COLOURS)
        assert classes == sorted(COLOURS) and first.mean((1, 2)).tolist() == [0, 0, 1]  # blue
        assert root.is_symlink() and root.resolve() == colours
        _no_leftovers(paths)
    assert _files(colours) == before  # the user's images are never touched


@pytest.mark.parametrize("left", ["link", "folder"])
def test_a_project_left_with_a_swap_half_done_prepares_again(project, left):
    """data/dataset.old (the link or digits an earlier swap set aside) and data/dataset.tmp
    (an interrupted write) are prepare's own leftovers: cleared, never followed."""
    paths, colours = project
    before = _files(colours)
    prepare(load_config(None, "smoke"), paths)
    data = paths.root / "data"
    if left == "link":  # what blocked every later prepare before
        (data / "dataset.old").symlink_to(colours, target_is_directory=True)
    else:  # a crash between the two renames: nothing at data/dataset
        (data / "dataset").rename(data / "dataset.old")
    (data / "dataset.tmp" / "train").mkdir(parents=True)
    prepare(load_config(None, "smoke"), paths)
    assert _read(paths)[0]["source"] == "digits"
    _no_leftovers(paths)
    prepare(load_config(None, "smoke", folder_settings(colours)), paths)
    assert _read(paths)[1] == sorted(COLOURS)
    assert _files(colours) == before


def test_a_folder_prepare_did_not_make_is_refused_and_kept(project):
    paths, colours = project
    mine = colour_folder(paths.dataset("data/dataset"))
    before = _files(mine)
    for cfg in (load_config(None, "smoke"), load_config(None, "smoke", folder_settings(colours))):
        with pytest.raises(DataError) as err:
            prepare(cfg, paths)
        (line,) = str(err.value).splitlines()
        assert line.startswith(f"{mine}: not made by `rae stage prepare`")
        assert "data.root" in line and f"data.source={mine}" in line
        assert _files(mine) == before
    # named as the source, it is read where it is
    prepare(load_config(None, "smoke", folder_settings("data/dataset")), paths)
    assert _read(paths)[1] == sorted(COLOURS) and _files(mine) == before


def _finish(paths: Paths, cfg, names, size: int = 4) -> None:
    """Stages recorded as finished under `cfg`, with stand-in outputs of `size` bytes."""
    for name in names:
        for rel in provenance.outputs(name, cfg):
            p = paths.root / rel
            target = p if p.suffix else p / "part.bin"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x" * size)
        provenance.record(name, cfg, paths, {})


UP_TO_EXTRACT = ("prepare", "pretrain-encoder", "stats", "extract")
ALL = (*UP_TO_EXTRACT, "train-decoder", "train-generator", "sample", "evaluate")


def test_inputs_of_another_preset_are_refused_in_one_line(tmp_path):
    paths, tiny, smoke = Paths.at(tmp_path), load_config(None, "tiny"), load_config(None, "smoke")
    _finish(paths, tiny, UP_TO_EXTRACT)
    provenance.check_inputs("train-generator", tiny, paths)
    with pytest.raises(DataError) as err:
        provenance.check_inputs("train-generator", smoke, paths)
    (line,) = str(err.value).splitlines()
    assert line.startswith("models/encoder: made under preset tiny (config ")
    assert "but train-generator runs under preset smoke (config " in line
    assert "encoder.name: 'mae-tiny' -> 'mae-micro'" in line
    assert line.endswith("re-make train-generator's inputs with "
                         "`rae run --preset smoke --until extract`")


def test_an_input_made_from_outputs_of_another_configuration_is_refused(tmp_path):
    """Samples carry only sample.* params: the generator they were drawn from decides."""
    paths, cfg = Paths.at(tmp_path), load_config(None, "smoke")
    _finish(paths, cfg, ALL)
    longer = load_config(None, "smoke", ["generator.steps=5"])
    provenance.check_inputs("evaluate", cfg, paths)
    with pytest.raises(DataError, match=r"^runs/samples \(from train-generator's outputs\): .*"
                                        r"generator.steps: 60 -> 5\); .* `rae run --preset "
                                        r"smoke --until sample`$"):
        provenance.check_inputs("evaluate", longer, paths)


def test_an_input_no_record_describes_is_read_as_it_is(tmp_path):
    """Outputs restored by DVC, or replaced since their record was written, are not judged by it;
    nor is rae_core's code (DVC re-runs only the stages whose code changed)."""
    paths = Paths.at(tmp_path)
    _finish(paths, load_config(None, "tiny"), UP_TO_EXTRACT)
    (paths.encoder_dir / "part.bin").write_bytes(b"another encoder")
    provenance.check_inputs("stats", load_config(None, "smoke"), paths)


def test_a_decoder_of_another_configuration_is_optional_to_the_generator_only(tmp_path, caplog):
    from rae_core.train.generator import _optional_decoder

    paths, cfg = Paths.at(tmp_path), load_config(None, "smoke")
    (paths.decoder_dir).mkdir(parents=True)
    (paths.decoder_dir / "decoder.pt").write_bytes(b"x")
    _finish(paths, cfg, ALL)
    other = load_config(None, "smoke", ["decoder.steps=5"])
    provenance.check_inputs("train-generator", other, paths)
    assert _optional_decoder(other, paths, None, "cpu") is None
    assert "no preview grids" in caplog.text and "decoder.steps: 40 -> 5" in caplog.text
    with pytest.raises(DataError, match=r"^models/decoder: .*`rae run --preset smoke "
                                        r"--until train-decoder`$"):
        provenance.check_inputs("sample", other, paths)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_HOME")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _rae(proj: Path, *args: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=proj,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def test_rae_stage_refuses_inputs_of_another_preset_before_anything_starts(tmp_path):
    """The tiny default's stages up to extract, then the generator alone under smoke: one line
    and exit code 1, from the driver, with no Prefect server, Ray or MLflow started."""
    _finish(Paths.at(tmp_path), load_config(None, "tiny"), UP_TO_EXTRACT)
    res = _rae(tmp_path, "stage", "train-generator", "--preset", "smoke",
               "--set", "generator.steps=5")
    assert res.returncode == 1, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("rae: error: models/encoder: made under preset tiny")
    assert line.endswith("`rae run --preset smoke --set generator.steps=5 --until extract`")
    home = tmp_path / ".prefect"
    try:  # the project's driver answered, and started nothing more
        assert not {"prefect", "ray"} & set(services.read(home)), services.read(home)
        assert not (tmp_path / "mlflow.db").exists()
        assert not provenance.record_path(Paths.at(tmp_path), "train-generator").exists()
    finally:
        services.stop_all(home)


@pytest.mark.e2e
def test_the_cli_reads_the_data_the_config_names_across_switches(tmp_path):
    """digits, the colours (pretrain-encoder and stats on them), digits, the colours: each
    command reads what its configuration names; stats of the colours are refused to a digits
    configuration, and are finished again once the colours are back."""
    colours = colour_folder(tmp_path / "colours")
    proj = tmp_path / "project"
    proj.mkdir()
    env = _env(RAE_SERVICES_IDLE_S="15")  # the shared Prefect and Ray stop soon after
    quick = ["--set", "encoder.pretrain.steps=4", "--set", "encoder.pretrain.ckpt_every=4",
             "--set", "encoder.pretrain.warmup_steps=1"]
    folder = [arg for s in folder_settings(colours) for arg in ("--set", s)] + quick

    def ok(*args: str) -> str:
        res = _rae(proj, *args, env=env)
        assert res.returncode == 0, f"{args}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        return res.stdout

    def summary() -> dict:
        return json.loads((proj / "data" / "dataset.json").read_text())

    ok("params", "--preset", "smoke")
    ok("run", "--until", "prepare")
    assert summary()["source"] == "digits" and len(summary()["classes"]) == 10
    ok("run", "--until", "stats", *folder)
    assert summary()["source"] == str(colours) and summary()["classes"] == sorted(COLOURS)
    stats = json.loads(provenance.record_path(Paths.at(proj), "stats").read_text())
    assert stats["outputs"]["count"] == TRAIN * len(COLOURS)  # the colours' training images

    res = _rae(proj, "stage", "stats", env=env)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("rae: error: data/dataset.json: made under preset smoke") and \
        "data.dataset: 'folder' -> 'digits'" in line
    assert line.endswith("`rae run --until pretrain-encoder`")

    ok("run", "--until", "prepare")
    assert summary()["source"] == "digits" and not (proj / "data" / "dataset").is_symlink()
    ok("stage", "prepare", *folder)
    assert (proj / "data" / "dataset").resolve() == colours
    again = ok("run", "--until", "stats", *folder)
    assert "stats: skipped (unchanged since" in again and "nothing to run" in again
