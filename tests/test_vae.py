"""The VAE family: registered AutoencoderKL configs (SD-VAE's size and cost), offline loading of
diffusers folders and single checkpoints, one-line errors, and the pretraining loop."""

import json
import re
import socket
import time

import pytest
import torch

from rae_core.errors import ConfigError, DataError, RaeError, WeightsMissingError
from rae_core.paths import Paths
from rae_core.presets import load_config
from rae_core.vae import (
    VAE_CONFIGS,
    build_vae,
    load_configured_parts,
    load_vae,
    load_vae_parts,
    save_vae,
    vae_macs,
    vae_param_counts,
    vae_parts,
    write_vae_config,
)


@pytest.fixture
def offline(monkeypatch):
    """No hub, and no network at all: any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def micro(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vae("vae-micro").eval()


def images(n: int = 3, res: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(1))


def assert_same_vae(reference: torch.nn.Module, encoder, decoder) -> None:
    x = images()
    with torch.no_grad():
        mean = reference.encode(x * 2 - 1).latent_dist.mean
        assert torch.equal(encoder.encode(x), mean)
        assert torch.equal(decoder(mean), reference.decode(mean).sample * 0.5 + 0.5)


def test_sd_vae_size_and_cost_match_the_reference():
    enc, dec, total = vae_param_counts("sd-vae")
    assert abs(total - 83_653_863) / 83_653_863 < 1e-3
    assert enc + dec == total
    # The reference split counts the encoder and decoder modules without the 1x1 quant convs
    # (8*8+8 and 4*4+4 parameters), which this split includes.
    assert (enc - 72, dec - 20) == (34_163_592, 49_490_179)
    enc_macs, dec_macs = vae_macs("sd-vae", 256)
    assert abs(enc_macs / 136.4e9 - 1) < 0.02, enc_macs
    assert abs(dec_macs / 311.1e9 - 1) < 0.02, dec_macs


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_every_registered_vae_builds_with_its_latent_shape(name):
    config = VAE_CONFIGS[name]
    res = config["sample_size"]
    with torch.device("meta"):
        vae = build_vae(name)
        z = vae.encode(torch.empty(2, 3, res, res)).latent_dist.mean
        out = vae.decode(z).sample
    f = 8 if name == "sd-vae" else 4
    assert z.shape == (2, 4, res // f, res // f) and out.shape == (2, 3, res, res)
    enc, dec, total = vae_param_counts(name)
    assert 0 < enc < total and 0 < dec < total


def test_tiny_vae_parts_shapes_and_interface():
    torch.manual_seed(0)
    encoder, decoder = vae_parts("vae-tiny", build_vae("vae-tiny"), 32)
    assert encoder.latent_shape == (4, 8, 8)
    assert encoder.pixel_mean == encoder.pixel_std == (0.5, 0.5, 0.5)
    x = images(5)
    z = encoder.encode(x)
    assert z.shape == (5, 4, 8, 8) and torch.equal(z, encoder.encode(x))  # the mean: no noise
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert decoder(z).shape == (5, 3, 32, 32)
    assert decoder.last_layer_weight is decoder.decoder.conv_out.weight
    assert all(p.requires_grad for p in decoder.parameters())
    ident = encoder.identity()
    assert ident["name"] == "vae-tiny" and ident["latent_shape"] == [4, 8, 8]
    with pytest.raises(ValueError, match="latents of shape"):
        decoder(torch.randn(1, 4, 4, 4))
    with pytest.raises(ConfigError, match="data.resolution = 30"):
        vae_parts("vae-tiny", build_vae("vae-tiny"), 30)


def test_diffusers_folder_round_trip_offline(tmp_path, offline):
    model = micro()
    folder = tmp_path / "vae"
    save_vae(model, folder)
    save_vae(micro(seed=1), folder)  # replaced as a whole
    save_vae(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no temporary left over
    encoder, decoder = load_vae_parts("vae-micro", folder, None, 32)
    assert_same_vae(model, encoder, decoder)
    ident = encoder.identity()
    assert ident["weights"] == "vae" and len(ident["weights_sha256"]) == 64


def _to_original_sd_layout(state: dict, stages: int) -> dict:
    """diffusers AutoencoderKL keys -> the original (LDM) names, with 1x1-conv attention."""
    def up(m: re.Match) -> str:  # diffusers numbers up stages as they run, LDM from full size
        return f"decoder.up.{stages - 1 - int(m[1])}"

    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample",
                   k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + ".block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: up(m) + ".upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                k = k.replace(f".{new}.", f".{old}.")
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[k] = value.contiguous()
    return out


def test_single_checkpoint_files_with_a_local_config(tmp_path, offline):
    from safetensors.torch import save_file

    model = micro()
    config = write_vae_config("vae-micro", tmp_path / "config")
    state = model.state_dict()
    original = _to_original_sd_layout(state, len(VAE_CONFIGS["vae-micro"]["block_out_channels"]))
    assert "encoder.down.0.block.0.conv1.weight" in original
    assert "decoder.up.0.upsample.conv.weight" not in original  # the last up stage has none
    assert "decoder.up.2.upsample.conv.weight" in original
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "diffusers.safetensors")
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in original.items()}},
               tmp_path / "sd.ckpt")
    for name in ("diffusers.safetensors", "sd.ckpt"):
        encoder, decoder = load_vae_parts("vae-micro", tmp_path / name, str(config), 32)
        assert_same_vae(model, encoder, decoder)


def _raises_quickly(error: type[RaeError], match: str, *args) -> str:
    start = time.monotonic()
    with pytest.raises(error, match=match) as info:
        load_vae(*args)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_or_mismatched_weights_name_the_setting(tmp_path, offline):
    from safetensors.torch import save_file

    save_vae(micro(), tmp_path / "micro")
    _raises_quickly(WeightsMissingError, "encoder.weights: .*not found",
                    "vae-micro", tmp_path / "absent")
    msg = _raises_quickly(ConfigError, "encoder.weights: .*is not a vae-tiny AutoencoderKL",
                          "vae-tiny", tmp_path / "micro")
    assert "block_out_channels [8, 16, 16] where vae-tiny has [16, 32, 64]" in msg
    assert "set encoder.name=vae-micro" in msg
    _raises_quickly(ConfigError, "encoder.name = 'sd-vea'.*did you mean 'sd-vae'",
                    "sd-vea", tmp_path / "micro")

    state = micro().state_dict()
    state.pop("decoder.conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "partial.safetensors")
    _raises_quickly(ConfigError, "autoencoder.config: null is not valid",
                    "vae-micro", tmp_path / "partial.safetensors", None)
    config = str(write_vae_config("vae-micro", tmp_path / "config"))
    msg = _raises_quickly(DataError, "encoder.weights: .*does not fit the vae-micro",
                          "vae-micro", tmp_path / "partial.safetensors", config)
    assert "missing ['decoder.conv_out.bias']" in msg and "unexpected ['extra.weight']" in msg
    _raises_quickly(ConfigError, "autoencoder.config: .*is not a vae-tiny",
                    "vae-tiny", tmp_path / "partial.safetensors", config)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    _raises_quickly(DataError, "encoder.weights: .*cannot be read",
                    "vae-micro", tmp_path / "junk.safetensors", config)


def test_pretraining_learns_to_reconstruct_and_resumes(tmp_path, digits_root, offline):
    from rae_core.data.folder import load_split
    from rae_core.train import pretrain_autoencoder
    from rae_core.train.decoder import evaluate_reconstruction

    cfg = load_config(None, "smoke", [
        f"data.root={digits_root}", "autoencoder.kind=vae", "encoder.name=vae-micro",
        "encoder.pretrain.steps=20", "encoder.pretrain.batch_size=32", "encoder.pretrain.lr=3e-3",
        "encoder.pretrain.warmup_steps=3", "encoder.pretrain.ckpt_every=10"])
    paths = Paths.at(tmp_path)
    loop = {"cfg": cfg.to_dict(), "root": str(tmp_path), "run_dir": str(tmp_path / "ckpt"),
            "fingerprint": "test"}
    torch.manual_seed(cfg.seed)  # the loop's initial weights
    val = load_split(digits_root, "val", 32)[0]
    before = evaluate_reconstruction(*vae_parts("vae-micro", build_vae("vae-micro"), 32), val)

    summary = pretrain_autoencoder.train_loop(loop)
    assert summary["val_l1"] < 0.5 * before["val_l1"], (before, summary)
    assert summary["val_psnr"] > before["val_psnr"] + 5
    logged = [json.loads(line) for line in
              paths.metrics_log("pretrain-encoder").read_text().splitlines()]
    steps = [r for r in logged if "metrics" in r and "l1" in r["metrics"]]
    assert [r["step"] for r in steps] == [10, 20]
    assert {"l1", "kl", "psnr"} <= set(steps[0]["metrics"])

    # The written folder is what the stages load (encoder.weights = null).
    encoder, decoder = load_configured_parts(cfg, paths)
    assert evaluate_reconstruction(encoder, decoder, val)["val_psnr"] == pytest.approx(
        summary["val_psnr"], abs=1e-4)
    again = pretrain_autoencoder.train_loop(loop)  # resumes at the last checkpoint: nothing to do
    assert again["resumed_at"] == 20 and again["val_psnr"] == pytest.approx(summary["val_psnr"])

    # train-decoder: without fine-tuning it keeps the VAE's own decoder as it is ...
    from rae_core.train import decoder as train_decoder

    kept = train_decoder.keep_vae_decoder(cfg, paths)
    assert kept["steps"] == 0 and kept["val_psnr"] == pytest.approx(summary["val_psnr"], abs=0.05)
    # ... and with autoencoder.finetune_decoder it trains the decoder only (SD's ft-EMA)
    ft = load_config(None, "smoke", [
        f"data.root={digits_root}", "autoencoder.kind=vae", "encoder.name=vae-micro",
        "autoencoder.finetune_decoder=true", "decoder.steps=30", "decoder.lr=3e-3",
        "decoder.warmup_steps=2", "decoder.ema=0.5", "decoder.gan.weight=0",
        "decoder.gan.disc_start_step=1000"])
    z_before = encoder.encode(val[:64])
    tuned = train_decoder.train_loop({"cfg": ft.to_dict(), "root": str(tmp_path),
                                      "run_dir": str(tmp_path / "ft"), "fingerprint": "ft"})
    assert tuned["val_psnr"] > kept["val_psnr"] + 0.5
    encoder2, _ = load_configured_parts(ft, paths)
    assert torch.equal(encoder2.encode(val[:64]), z_before)  # the encoder stays frozen
    from rae_core.autoencoder import load_decoder

    dec = load_decoder(ft, paths, encoder2)
    assert evaluate_reconstruction(encoder2, dec, val)["val_psnr"] == pytest.approx(
        tuned["val_psnr"], abs=1e-3)


def test_the_pretrained_vae_is_keyed_by_the_decoder_losses_it_uses_and_nothing_else_there():
    from rae_core.train.pretrain_autoencoder import fingerprint

    base = ["autoencoder.kind=vae", "encoder.name=vae-micro"]
    fp = fingerprint(load_config(None, "smoke", base))
    for change in ("decoder.lpips_weight=0.5", "decoder.gan.weight=0.2",
                   "autoencoder.kl_weight=1e-4", "encoder.pretrain.steps=7"):
        assert fingerprint(load_config(None, "smoke", [*base, change])) != fp, change
    for change in ("decoder.noise_tau=0.3", "decoder.steps=7", "generator.steps=7"):
        assert fingerprint(load_config(None, "smoke", [*base, change])) == fp, change
