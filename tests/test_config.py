import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rae_core.config import Config, apply_overrides, from_dict
from rae_core.errors import ConfigError
from rae_core.presets import PRESETS, load_config, preset_yaml


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips_through_yaml(name):
    cfg = load_config(None, name)
    assert cfg.preset == name
    again = from_dict(yaml.safe_load(preset_yaml(name)))
    assert again == cfg


def test_imagenet_presets_carry_the_paper_settings():
    cfg = load_config(None, "imagenet256")
    assert cfg.encoder.name == "dinov2-b" and cfg.decoder.model == "ViT-XL"
    assert cfg.decoder.noise_tau == 0.8 and cfg.decoder.lr == 2e-4 and cfg.decoder.ema == 0.9978
    assert cfg.decoder.steps == round(16 * 1_281_167 / 512)
    assert cfg.generator.model == "DiTDH-XL" and cfg.generator.batch_size == 1024 and cfg.generator.ema == 0.9995
    assert cfg.generator.steps == round(800 * 1_281_167 / 1024)
    assert cfg.sample.guidance == "autoguidance" and cfg.sample.scale == 1.42
    assert load_config(None, "imagenet512").data.resolution == 512


@pytest.mark.parametrize("override, names", [
    ("generator.depht=3", ["generator.depht", "generator.depth"]),
    ("generator.steps=abc", ["generator.steps", "'abc'", "int"]),
    ("generator.lr=-1", ["generator.lr", "-1", "range"]),
    ("sample.guidance=strong", ["sample.guidance", "'strong'", "'cfg'"]),
    ("generator.ema=1.5", ["generator.ema", "1.5", "[0.0, 1.0]"]),
    ("generator.shift=-1", ["generator.shift", "-1.0", "(0.0, inf]"]),
    ("nosuch=1", ["nosuch", "valid keys"]),
])
def test_bad_values_name_the_key_the_value_and_what_is_valid(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, "tiny", [override])
    msg = str(err.value)
    assert "\n" not in msg
    for part in names:
        assert part in msg


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, "smoke", ["generator.steps=7", "sample.interval=[0.1, 0.9]",
                                      "encoder.weights=null", "generator.lr=1e-4"])
    assert cfg.generator.steps == 7 and cfg.sample.interval == [0.1, 0.9]
    assert cfg.generator.lr == 1e-4 and isinstance(cfg.generator.lr, float)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_inconsistent_values_are_refused():
    with pytest.raises(ConfigError, match="generator.batch_size"):
        load_config(None, "tiny", ["generator.batch_size=100", "generator.grad_accum=3"])
    with pytest.raises(ConfigError, match="sample.interval"):
        load_config(None, "tiny", ["sample.interval=[0.8, 0.2]"])
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, "tiny", ["data.dataset=folder"])


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean smoke"):
        load_config(None, "smok")


def test_params_file_is_used_without_preset(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"preset": "custom", "generator": {"steps": 11}}))
    cfg = load_config(str(p))
    assert cfg.preset == "custom" and cfg.generator.steps == 11 and cfg.decoder == Config().decoder
    p.write_text("generator: [unclosed")
    with pytest.raises(ConfigError, match="params.yaml"):
        load_config(str(p))


def test_fingerprint_tracks_only_the_named_sections():
    a, b = load_config(None, "tiny"), load_config(None, "tiny", ["sample.steps=10"])
    assert a.fingerprint("generator") == b.fingerprint("generator")
    assert a.fingerprint() != b.fingerprint()


def _rae(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_rejects_a_typo_fast_with_exit_code_2(tmp_path):
    t0 = time.time()
    res = _rae("run", "--preset", "smoke", "--set", "generator.depht=3", cwd=tmp_path)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "generator.depht" in line and "generator.depth" in line
    assert time.time() - t0 < 30


def test_cli_refuses_a_dit_narrower_than_the_latent(tmp_path):
    res = _rae("stage", "train-generator", "--preset", "smoke", "--set", "generator.model=DiT-micro",
               "--set", "generator.hidden=16", cwd=tmp_path)
    assert res.returncode == 2
    assert "width" in res.stderr and "generator.model" in res.stderr


def test_cli_params_writes_a_preset(tmp_path):
    res = _rae("params", "--preset", "smoke", "--set", "generator.steps=5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = load_config(str(tmp_path / "params.yaml"))
    assert cfg.preset == "smoke" and cfg.generator.steps == 5


def test_leaderboard_reads_the_configured_experiment(tmp_path):
    from flows.cli import _experiment, parser

    (tmp_path / "params.yaml").write_text("preset: tiny\ntracking:\n  experiment: mine\n")
    args = parser().parse_args(["leaderboard", "--params", str(tmp_path / "params.yaml")])
    assert args.experiment is None and _experiment(args) == "mine"
    args = parser().parse_args(["leaderboard", "--preset", "smoke"])
    assert _experiment(args) == "rae"


def test_rae_ui_finds_mlflow_beside_its_own_python_without_path(monkeypatch):
    from flows.cli import venv_tool
    from rae_core.errors import RaeError

    monkeypatch.setenv("PATH", "/nonexistent")
    assert venv_tool("mlflow") == str(Path(sys.executable).parent / "mlflow")
    with pytest.raises(RaeError, match=r"^no-such-tool: not installed beside .* run `make install`$"):
        venv_tool("no-such-tool")
