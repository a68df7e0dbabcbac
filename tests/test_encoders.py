import hashlib
import math
import time

import pytest
import torch

from rae_core.encoders import LatentStats, build_encoder, pixels_decode
from rae_core.errors import ConfigError, DataError, RaeError, WeightsMissingError


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stripe_images(n: int, res: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic structured images in [0, 1]: coloured sinusoidal stripes, 1-3 cycles per
    image at a random angle, so masked patches are predictable from visible ones."""
    g = torch.Generator().manual_seed(seed)
    theta, freq, phase = torch.rand(3, n, 1, 1, generator=g) * torch.tensor(
        [math.pi, 2.0, 2 * math.pi]).view(3, 1, 1, 1)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    c = (torch.arange(res) + 0.5) / res
    rows, cols = torch.meshgrid(c, c, indexing="ij")
    proj = cols * theta.cos() + rows * theta.sin()  # (n, res, res)
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * (1 + freq) * proj + phase)
    return wave.unsqueeze(1) * colour


def assert_plain_normalised(z: torch.Tensor) -> None:
    """Every token's channel vector has mean 0 and variance 1: a LayerNorm without affine."""
    tokens = z.flatten(2).transpose(1, 2).double()  # (B, N, C)
    assert tokens.mean(-1).abs().max() < 1e-4
    assert (tokens.var(-1, unbiased=False) - 1).abs().max() < 1e-3


IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name,input_size,mean", [("dinov2-b", 224, IMAGENET_MEAN),
                                                  ("siglip2-b", 256, (0.5, 0.5, 0.5)),
                                                  ("mae-b", 256, IMAGENET_MEAN)])
def test_imagenet_encoders_give_16x16x768_plain_normalised_frozen_latents(name, input_size, mean):
    torch.manual_seed(0)
    enc = build_encoder(name, 256, random_init=True)
    assert enc.input_size == input_size and enc.pixel_mean == mean  # timm's pretrained cfg
    z = enc.encode(torch.rand(1, 3, 256, 256))
    assert z.shape == (1, 768, 16, 16)
    assert enc.latent_shape == (768, 16, 16)
    assert not z.requires_grad and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert_plain_normalised(z)
    assert not enc.model.norm.elementwise_affine
    ident = enc.identity()
    assert ident["name"] == name and ident["weights"] == "random"
    assert ident["latent_shape"] == [768, 16, 16]


def test_small_encoders_at_32px():
    torch.manual_seed(0)
    x = stripe_images(2)
    for name, shape in [("mae-tiny", (64, 4, 4)), ("mae-micro", (64, 4, 4)),
                        ("pixels", (192, 4, 4))]:
        enc = build_encoder(name, 32, random_init=True)
        assert enc.encode(x).shape == (2, *shape) and enc.latent_shape == shape
        assert not any(p.requires_grad for p in enc.parameters())
    assert len(build_encoder("mae-micro", 32, random_init=True).blocks) == 2
    wide = build_encoder("mae-tiny", 64, random_init=True, width=32, patch=16)
    assert wide.encode(stripe_images(1, 64)).shape == (1, 32, 4, 4)
    with pytest.raises(ConfigError, match="width"):
        build_encoder("dinov2-b", 256, random_init=True, width=32)


def test_mae_latent_ignores_the_final_norm_affine():
    torch.manual_seed(0)
    enc = build_encoder("mae-tiny", 32, random_init=True)
    with torch.no_grad():  # as a trained model would have them
        enc.norm.weight.fill_(3.0)
        enc.norm.bias.fill_(1.0)
    assert_plain_normalised(enc.encode(stripe_images(2)))


def test_pixels_encoder_is_exactly_invertible():
    x = stripe_images(3)
    enc = build_encoder("pixels", 32)
    assert enc.has_exact_inverse and not build_encoder("mae-micro", 32, random_init=True).has_exact_inverse
    z = enc.encode(x)
    assert torch.allclose(z.mean(), (x.mean() - 0.5) / 0.5, atol=1e-6)
    assert torch.equal(pixels_decode(z), enc.decode(z))
    assert torch.allclose(pixels_decode(z), x, atol=1e-6)
    assert build_encoder("pixels", 256).latent_shape == (768, 16, 16)


def test_unknown_encoder_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'dinov2-b'") as e:
        build_encoder("dinov2b", 256)
    assert "siglip2-b" in str(e.value)


def test_missing_weights_fail_fast_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    start = time.monotonic()
    missing = tmp_path / "dino-missing.safetensors"
    with pytest.raises(WeightsMissingError, match="dino-missing.safetensors"):
        build_encoder("dinov2-b", 256, weights=str(missing))
    with pytest.raises(WeightsMissingError, match="encoder.weights"):
        build_encoder("mae-b", 256)  # nothing in the (empty) hub cache
    with pytest.raises(WeightsMissingError, match="encoder.weights"):
        build_encoder("mae-tiny", 32)
    with pytest.raises(WeightsMissingError, match="mae-missing.pt"):
        build_encoder("mae-tiny", 32, weights=str(tmp_path / "mae-missing.pt"))
    assert time.monotonic() - start < 5


def test_mae_weights_round_trip_and_identity(tmp_path):
    torch.manual_seed(0)
    trained = build_encoder("mae-micro", 32, random_init=True)
    path = tmp_path / "encoder.pt"
    torch.save(trained.state_dict(), path)
    loaded = build_encoder("mae-micro", 32, weights=str(path))
    x = stripe_images(2)
    assert torch.equal(loaded.encode(x), trained.encode(x))
    ident = loaded.identity()
    assert ident["weights"] == "encoder.pt" and len(ident["weights_sha256"]) == 64
    with pytest.raises(RaeError, match="not a state dict"):
        build_encoder("mae-tiny", 32, weights=str(path))  # depth 4 vs the file's depth 2


def test_mae_loss_decreases_with_training():
    torch.manual_seed(0)
    mae = build_encoder("mae-tiny", 32, random_init=True).train().requires_grad_(True)
    opt = torch.optim.Adam(mae.parameters(), lr=1e-3)
    x = stripe_images(8, seed=1)

    def loss_at(step: int) -> torch.Tensor:
        return mae.mae_loss(x, generator=torch.Generator().manual_seed(step))

    with torch.no_grad():
        start = sum(loss_at(s) for s in range(4)) / 4
    for step in range(100):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = sum(loss_at(1000 + s) for s in range(4)) / 4  # masks never seen in training
    assert end < 0.6 * start, (float(start), float(end))
    same = [mae.mae_loss(x, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])  # the generator fixes the mask
    assert torch.isfinite(mae.mae_loss(x, mask_ratio=0.0))


def data_shards(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 4, 5, generator=g) * 3 + 5 for n in (1, 7, 29, 2)]


def test_latent_stats_match_torch_and_merge_exactly():
    shards = data_shards()
    everything = torch.cat(shards).double()
    single = LatentStats((3, 4, 5))
    for s in shards:
        single.update(s)
    parts = []
    for group in (shards[:1], shards[1:3], shards[3:]):  # unequal shards, several updates each
        st = LatentStats((3, 4, 5))
        for s in group:
            st.update(s)
        parts.append(st)
    merged = LatentStats.from_state_dict(parts[0].state_dict())
    for p in parts[1:]:
        merged.merge(LatentStats.from_state_dict(p.state_dict()))
    for st in (single, merged):
        assert st.count == len(everything)
        assert torch.allclose(st.mean, everything.mean(0), rtol=0, atol=1e-10)
        assert torch.allclose(st.var, everything.var(0, unbiased=False), rtol=0, atol=1e-10)
    assert not torch.allclose(merged.var, everything.var(0, unbiased=True), atol=1e-3)


def test_latent_stats_normalise_round_trip():
    shards = data_shards(1)
    st = LatentStats((3, 4, 5))
    for s in shards:
        st.update(s)
    z = torch.cat(shards)
    n = st.normalize(z)
    assert n.dtype == z.dtype
    assert n.double().mean(0).abs().max() < 1e-5
    assert (n.double().var(0, unbiased=False) - 1).abs().max() < 1e-4
    assert torch.allclose(st.denormalize(n), z, atol=1e-5)


def test_latent_stats_save_load_and_refuse_mismatch(tmp_path):
    st = LatentStats((3, 4, 5))
    st.update(data_shards()[2])
    ident = build_encoder("pixels", 32).identity()
    path = tmp_path / "stats" / "latent_stats.pt"
    st.save(path, ident)
    # no temp file left; the checksum `load` verifies beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["latent_stats.pt",
                                                              "latent_stats.pt.sha256"]
    loaded = LatentStats.load(path, expected_identity=dict(ident))
    assert torch.equal(loaded.mean, st.mean) and torch.equal(loaded.var, st.var)
    other = build_encoder("pixels", 64).identity()
    with pytest.raises(RaeError, match="resolution") as e:
        LatentStats.load(path, expected_identity=other)
    message = str(e.value)
    assert "\n" not in message and '"resolution": 32' in message and '"resolution": 64' in message
    with pytest.raises(RaeError):
        LatentStats.load(path, expected_identity={**ident, "name": "mae-tiny"})
    with pytest.raises(DataError):
        LatentStats.load(tmp_path / "absent.pt", expected_identity=ident)


def test_weight_files_that_differ_only_past_their_start_have_different_fingerprints(tmp_path):
    from rae_core.encoders import file_fingerprint

    head = bytes(3 << 20)  # a shared first 3 MiB, as two fine-tunes of one model share
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(head + b"decoder-ema")
    b.write_bytes(head + b"decoder-mse")
    assert file_fingerprint(a) != file_fingerprint(b)
    assert file_fingerprint(a) == hashlib.sha256(a.read_bytes()).hexdigest()
