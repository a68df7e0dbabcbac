import math

import pytest
import torch
import torch.nn.functional as F

from rae_core.decoder import DECODERS, build_decoder, decoder_param_count, sincos_pos_embed_2d
from rae_core.encoders import build_encoder
from rae_core.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, res: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic images in [0, 1]: random 4x4 colour grids, bilinearly upsampled."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(res, res), mode="bilinear", align_corners=False)


def tiny(name: str = "ViT-micro", **kw) -> torch.nn.Module:
    return build_decoder(name, 64, 4, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), **kw)


@pytest.mark.parametrize("name,expected", [("ViT-B", 86e6), ("ViT-L", 304e6),
                                           ("ViT-XL", 415e6)])
def test_paper_decoder_sizes(name, expected):
    count = decoder_param_count(name)
    assert abs(count - expected) / expected < 0.01, count


def test_output_shapes_at_256_and_32_px():
    with torch.device("meta"):  # full-size shapes without the memory or the compute
        dec = build_decoder("ViT-XL", 768, 16, 16, IMAGENET_MEAN, IMAGENET_STD)
        out = dec(torch.empty(2, 768, 16, 16))
        assert out.shape == (2, 3, 256, 256)
        assert build_decoder("ViT-B", 768, 32, 16, IMAGENET_MEAN, IMAGENET_STD)(
            torch.empty(1, 768, 32, 32)).shape == (1, 3, 512, 512)
    dec = tiny("ViT-tiny").eval()
    assert dec(torch.randn(3, 64, 4, 4)).shape == (3, 3, 32, 32)
    assert dec.last_layer_weight.shape == (8 * 8 * 3, 128)
    assert dec.last_layer_weight is dec.head.weight
    with pytest.raises(ValueError, match="latents of shape"):
        dec(torch.randn(1, 32, 4, 4))


def test_output_is_mapped_back_with_the_encoder_mean_and_std():
    dec = build_decoder("ViT-micro", 64, 4, 8, IMAGENET_MEAN, IMAGENET_STD).eval()
    with torch.no_grad():
        dec.head.weight.zero_()
        dec.head.bias.fill_(1.0)  # predicts +1 in normalised space everywhere
    out = dec(torch.randn(2, 64, 4, 4))
    expected = (torch.tensor(IMAGENET_MEAN) + torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    assert torch.allclose(out, expected.expand_as(out), atol=1e-6)


def test_fixed_sincos_position_embedding():
    pos = sincos_pos_embed_2d(64, 4)
    assert pos.shape == (16, 64)
    assert torch.allclose(pos.square().sum(1), torch.full((16,), 32.0))  # 32 (sin, cos) pairs
    assert len({tuple(row.tolist()) for row in pos}) == 16  # every position distinct
    dec = tiny()
    assert "pos_embed" not in dec.state_dict()
    assert not any(p is dec.pos_embed for p in dec.parameters())


def test_noise_only_in_training_mode():
    torch.manual_seed(0)
    dec, z = tiny(noise_tau=0.8), torch.randn(4, 64, 4, 4)
    dec.eval()
    assert torch.equal(dec(z), dec(z))
    dec.train()
    assert not torch.allclose(dec(z), dec(z))
    quiet = tiny(noise_tau=0.0).train()
    assert torch.equal(quiet(z), quiet(z))


@pytest.mark.parametrize("law,mean_sigma", [("paper", 0.8 * math.sqrt(2 / math.pi)),
                                            ("reference", 0.8 / 2)])
def test_noise_sigma_laws(law, mean_sigma):
    torch.manual_seed(0)
    dec = tiny(noise_tau=0.8, noise_law=law)
    z = torch.zeros(5000, 64, 8, 8)  # the grid only shapes the noise; no forward pass
    sigma = dec.noise_augment(z).flatten(1).std(1)  # per-sample noise scale, 4096 draws each
    assert abs(sigma.mean() - mean_sigma) < 0.02, float(sigma.mean())
    if law == "paper":  # |N(0, tau^2)|: E sigma^2 = tau^2, unbounded
        assert abs(sigma.square().mean() - 0.64) < 0.04 and sigma.max() > 0.8 * 1.5
    else:  # tau * U(0, 1): E sigma^2 = tau^2 / 3, never beyond tau
        assert abs(sigma.square().mean() - 0.64 / 3) < 0.01 and sigma.max() < 0.8 * 1.05
    with pytest.raises(ConfigError):
        tiny(noise_tau=0.8, noise_law="uniform")


def test_unknown_decoder_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'ViT-XL'"):
        tiny("ViT-XXL")
    assert set(DECODERS) == {"ViT-B", "ViT-L", "ViT-XL", "ViT-tiny", "ViT-micro"}


def test_tiny_decoder_learns_to_reconstruct_from_mae_micro_latents():
    torch.manual_seed(0)
    enc = build_encoder("mae-micro", 32, random_init=True)
    images = smooth_images(8, seed=3)
    z = enc.encode(images)
    c, h, _ = enc.latent_shape
    dec = build_decoder("ViT-micro", c, h, 8, enc.pixel_mean, enc.pixel_std).train()
    opt = torch.optim.Adam(dec.parameters(), lr=2e-3)
    with torch.no_grad():
        start = (dec(z) - images).abs().mean()
    for _ in range(150):
        loss = (dec(z) - images).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = (dec.eval()(z) - images).abs().mean()
    assert end < 0.3 * start, (float(start), float(end))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_refine_keeps_the_output_shape_of_every_decoder(name):
    with torch.device("meta"):
        dec = build_decoder(name, 64, 4, 8, IMAGENET_MEAN, IMAGENET_STD, refine_channels=16)
        assert dec(torch.empty(2, 64, 4, 4)).shape == (2, 3, 32, 32)
    assert tiny().refine is None  # off by default: the paper's decoder


@pytest.mark.parametrize("kernel", [3, 5])
def test_refine_starts_as_the_identity(kernel):
    torch.manual_seed(0)
    plain, refined = tiny().eval(), tiny(refine_channels=16, refine_kernel=kernel).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("refine.") for k in missing)
    z = torch.randn(3, 64, 4, 4)
    with torch.no_grad():
        assert torch.equal(refined(z), plain(z))


def test_refine_learns_to_join_patches_across_their_edges():
    from rae_core.decoder import Refine
    from rae_core.evaluation import seam_energies, seam_ratio

    torch.manual_seed(0)
    target = smooth_images(16, seed=5)
    blocky = F.interpolate(F.avg_pool2d(target, 8), scale_factor=8, mode="nearest")
    blocky = blocky + 0.01 * torch.randn(blocky.shape)  # some texture inside the patches
    refine = Refine(16)
    opt = torch.optim.Adam(refine.parameters(), lr=1e-2)
    for _ in range(150):
        loss = (refine(blocky) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert refine.outer.weight.abs().sum() > 0  # the zero-initialised conv receives gradients
    with torch.no_grad():
        out = refine(blocky)
    assert (out - target).abs().mean() < 0.7 * (blocky - target).abs().mean()
    seams = [seam_ratio(seam_energies(x, 8)) for x in (blocky, out, target)]
    assert seams[0] > 10 and seams[1] < 0.2 * seams[0], seams
