import json
import math
import pickle
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


# Checkpoints and outputs are keyed by these; a new key or default changes them (last: the
# released weights of generator and decoder, evaluate.reference; the rehearsal's encoder, decoder
# and weak-model keys).
@pytest.mark.parametrize("preset, sections, key", [
    (None, (), "9703c297e5c2"),
    (None, ("generator",), "ff4950537501"),
    ("tiny", (), "773acd4eabe1"),
    ("smoke", (), "602884b2a7a5"),
    ("smoke", ("data", "seed"), "30a90aac716c"),
    ("smoke", ("data", "autoencoder", "encoder", "decoder", "seed"), "278c5999cf36"),
    ("imagenet256-hart", (), "f154aaacde07"),
    ("imagenet256-hart", ("generator",), "4204c8b3e6ba"),
    ("rehearsal", (), "68266db10263"),
    ("rehearsal", ("generator",), "960b21009b68"),
])
def test_fingerprints_are_stable(preset, sections, key):
    cfg = Config() if preset is None else load_config(None, preset)
    assert cfg.fingerprint(*sections) == key


def test_fingerprint_of_float_overrides_given_as_ints_and_strings_is_stable():
    cfg = load_config(None, "tiny", ["generator.lr=1e-4", "sample.interval=[0, 1]"])
    assert cfg.sample.interval == [0.0, 1.0] and cfg.fingerprint() == "8bd01555100f"


GAN_KEYS = ("decoder.gan.disc, decoder.gan.disc_weights, decoder.gan.weight, "
               "decoder.gan.disc_start_step, decoder.gan.gen_start_step, decoder.gan.disc_lr, "
               "decoder.gan.diffaug")


@pytest.mark.parametrize("data, message", [
    ({"decoder": {"gan": {"weigth": 1}}},
     f"decoder.gan.weigth: unknown key; did you mean decoder.gan.weight? (valid keys: {GAN_KEYS})"),
    ({"decoder": {"gan": {"zzz": 1}}}, f"decoder.gan.zzz: unknown key (valid keys: {GAN_KEYS})"),
    ({"decoder": {"gan": {"disc_start_step": 1.5}}},
     "decoder.gan.disc_start_step: 1.5 is not valid; expected int"),
    ({"decoder": {"gan": {"disc": "big"}}},
     "decoder.gan.disc: 'big' is not valid; expected one of 'small', 'dino'"),
    ({"decoder": {"gan": {"disc_weights": 3}}},
     "decoder.gan.disc_weights: 3 is not valid; expected str or null"),
    ({"decoder": {"gan": {"weight": -1}}},
     "decoder.gan.weight: -1.0 is out of range; valid values lie in [0.0, inf]"),
    ({"decoder": {"gan": {"disc_lr": "0"}}},
     "decoder.gan.disc_lr: 0.0 is out of range; valid values lie in (0.0, inf]"),
    ({"schedule": {"tolerance": {"fid": -0.5}}},
     "schedule.tolerance.fid: -0.5 is out of range; valid values lie in [0.0, inf]"),
    ({"data": {"resolution": 4096}},
     "data.resolution: 4096 is out of range; valid values lie in [8, 2048]"),
    ({"generator": {"shift": 0}}, "generator.shift: 0.0 is out of range; valid values lie in (0.0, inf]"),
    ({"generator": {"lr": math.nan}}, "generator.lr: nan is out of range; valid values lie in (0.0, inf]"),
    ({"generator": {"hidden": 0}}, "generator.hidden: 0 is out of range; valid values lie in [1, inf]"),
    ({"decoder": {"gan": 3}}, "decoder.gan: expected a mapping, got 3"),
    ({"decoder": None}, "decoder: expected a mapping, got None"),
    ([1], "params: expected a mapping, got [1]"),
    ({"generator": {"betas": [0.9, "x"]}}, "generator.betas: 'x' is not valid; expected float"),
    ({"generator": {"betas": 0.9}}, "generator.betas: 0.9 is not valid; expected a list of float"),
    ({"autoencoder": {"scales": [1, "x"]}},
     "autoencoder.scales: [1, 'x'] is not valid; expected a list of int or null"),
    ({"autoencoder": {"scale": True}}, "autoencoder.scale: True is not valid; expected float or null"),
])
def test_errors_read_as_one_exact_line(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert str(err.value) == message


@pytest.mark.parametrize("key, value, kind", [
    ("generator.steps", 1.5, "int"), ("generator.steps", "3", "int"), ("generator.steps", True, "int"),
    ("generator.steps", 3.0, "int"), ("generator.lr", True, "float"), ("generator.lr", "1e-4x", "float"),
    ("generator.lr", "inf", "float"), ("generator.compile", 1, "bool"),
    ("generator.compile", "yes", "bool"), ("generator.model", 3, "str"), ("preset", 1.5, "str"),
])
def test_types_are_strict(key, value, kind):
    section, name = key.rsplit(".", 1) if "." in key else (None, key)
    data = {section: {name: value}} if section else {name: value}
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert str(err.value) == f"{key}: {value!r} is not valid; expected {kind}"


def test_floats_take_ints_numeric_strings_and_tuples():
    cfg = from_dict({"generator": {"lr": " 1e-4 ", "min_lr": 0, "betas": (0.9, "0.99")},
                     "sample": {"interval": [0, 1]}})
    assert cfg.generator.lr == 1e-4 and isinstance(cfg.generator.min_lr, float)
    assert cfg.generator.betas == [0.9, 0.99] and cfg.sample.interval == [0.0, 1.0]
    assert all(isinstance(v, float) for v in cfg.sample.interval)


def test_the_first_error_in_key_order_is_named():
    assert _error({"generator": {"steps": "x", "lr": -1}}).startswith("generator.steps:")
    assert _error({"generator": {"lr": -1, "steps": "x"}}).startswith("generator.lr:")
    assert _error({"sample": {"steps": 0}, "generator": {"stepz": 1}}).startswith("sample.steps:")
    assert _error({"generator": {"stepz": 1}, "sample": {"steps": 0}}).startswith("generator.stepz:")
    assert _error({"generator": {"betas": ["a", "b"]}}) == \
        "generator.betas: 'a' is not valid; expected float"


def _error(data) -> str:
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    return str(err.value)


@pytest.mark.parametrize("data, message", [
    ({"data": {"dataset": "folder", "source": ""}},
     "data.source: null is not valid with data.dataset=folder; give the path of an image folder "
     "with train/ and val/ sub-folders"),
    ({"ray": {"num_workers": 3}},
     "generator.batch_size: 128 is not divisible by generator.grad_accum x ray.num_workers = 3"),
    ({"sample": {"interval": [0.5]}},
     "sample.interval: [0.5] is not valid; expected [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1"),
    ({"generator": {"kind": "ddpm"}},
     "sample.sampler: 'euler' is not valid with generator.kind=ddpm; expected one of ddpm, ddim"),
    ({"generator": {"kind": "ddpm"}, "sample": {"sampler": "ddim", "guidance": "autoguidance"}},
     "sample.guidance: 'autoguidance' is not valid with generator.kind=ddpm; expected 'none' or 'cfg'"),
    ({"generator": {"kind": "hart"}, "sample": {"sampler": "scalewise"}},
     "generator.kind: 'hart' is not valid with autoencoder.kind=rae; 'hart' generates the tokens "
     "of a 'hybrid-vq' tokenizer, and only it"),
    ({"generator": {"mask_ratio": [0.7, 0.5]}},
     "generator.mask_ratio: [0.7, 0.5] is not valid; expected [lo, hi] with 0 < lo <= hi <= 1"),
    ({"sample": {"guidance": "autoguidance"}},
     "sample.weak_model: null is not valid with sample.guidance=autoguidance; give a checkpoint "
     "file of the weaker model"),
])
def test_cross_field_errors_read_as_before(data, message):
    assert _error(data) == message


def test_configs_pickle_and_give_a_json_schema():
    cfg = load_config(None, "smoke-hart", ["generator.steps=3"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert Config.model_validate_json(cfg.model_dump_json()) == cfg
    schema = Config.model_json_schema()
    lr = schema["$defs"]["GeneratorConfig"]["properties"]["lr"]
    assert lr["type"] == "number" and lr["exclusiveMinimum"] == 0.0
    assert schema["$defs"]["GeneratorConfig"]["additionalProperties"] is False


def test_to_dict_is_plain_and_ordered_as_the_schema():
    d = Config().to_dict()
    assert list(d) == ["preset", "seed", "data", "autoencoder", "encoder", "stats", "extract",
                       "decoder", "generator", "sample", "evaluate", "ray", "tracking", "schedule"]
    assert type(d["encoder"]["pretrain"]) is dict and json.loads(json.dumps(d)) == d
    assert Config().flat()["schedule.tolerance.fid"] == 0.5


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


@pytest.mark.parametrize("override, line", [
    ("x.y=bad", "rae: error: x: unknown key (valid keys: preset, seed, data, autoencoder, encoder, "
                "stats, extract, decoder, generator, sample, evaluate, ray, tracking, schedule)"),
    ("generator.lr=-1", "rae: error: generator.lr: -1.0 is out of range; valid values lie in (0.0, inf]"),
])
def test_cli_params_refuses_a_bad_value_with_exit_code_2(tmp_path, override, line):
    res = _rae("params", "--set", override, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == line
    assert not (tmp_path / "params.yaml").exists()


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
