import time

import pytest
import torch

from rae_core.discriminator import DinoDiscriminator, SmallDiscriminator, build_discriminator
from rae_core.errors import ConfigError, WeightsMissingError
from rae_core.losses import (
    LPIPSLoss,
    adaptive_gan_weight,
    diff_augment,
    generator_loss,
    hinge_d_loss,
)


@pytest.fixture(autouse=True)
def single_thread():
    """Small models run fastest on one thread, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_adaptive_weight_matches_a_hand_computation():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], requires_grad=True)
    x, t, c = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -1.0]), torch.tensor([2.0, -1.0])
    y = w @ x
    rec = ((y - t) ** 2).sum()  # grad_W = 2 (y - t) x^T
    gan = (c * y).sum()  # grad_W = c x^T
    expected = (2 * (y - t)).norm() * x.norm() / (c.norm() * x.norm() + 1e-6)  # rank-1 norms
    lam = adaptive_gan_weight(rec, gan, w)
    assert torch.allclose(lam, expected.detach(), rtol=1e-6)
    assert not lam.requires_grad and lam.dtype == torch.float32
    (rec + lam * gan).backward()  # the graphs survive for the real backward pass
    assert w.grad is not None


def test_adaptive_weight_is_clamped():
    w = torch.ones(2, 2, requires_grad=True)
    rec = (w * 1e3).sum()
    gan = (w * 1e-9).sum()  # nearly no GAN gradient: the ratio explodes
    assert adaptive_gan_weight(rec, gan, w) == 1e4
    assert adaptive_gan_weight(rec, gan, w, max_weight=5.0) == 5.0


def test_hinge_and_generator_losses_known_values():
    real, fake = torch.tensor([2.0, 0.0, 0.5]), torch.tensor([-2.0, 0.5, -0.5])
    # relu(1 - real) = (0, 1, 0.5) -> 0.5; relu(1 + fake) = (0, 1.5, 0.5) -> 2/3
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.5 + 2 / 3)))
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)) == 0  # confident, right
    assert torch.isclose(generator_loss(fake), torch.tensor(2 / 3))


def test_diff_augment_shape_determinism_and_gradient():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = diff_augment(x, g1), diff_augment(x, g2)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, diff_augment(x, g1))  # a fresh draw differs
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diff_augment_is_identity_in_distribution():
    """On a flat grey image, saturation and contrast are no-ops and translations stay inside
    the image for the central pixels; the brightness shift is U(-0.5, 0.5)."""
    torch.manual_seed(0)
    x = torch.full((4000, 3, 32, 32), 0.4)
    out = diff_augment(x, torch.Generator().manual_seed(0))
    centre = out[:, :, 4:28, 4:28]
    assert abs(centre.mean() - 0.4) < 0.02
    assert abs(centre[:, 0, 0, 0].std() - 1 / 12 ** 0.5) < 0.02
    assert (centre.std(dim=(1, 2, 3)) < 1e-5).all()  # each output stays flat in the centre
    edges = [out[:, :, 0], out[:, :, -1], out[:, :, :, 0], out[:, :, :, -1]]
    shifted = torch.stack([(e == 0).all(dim=(1, 2)) for e in edges]).any(0)
    assert 0.95 < shifted.float().mean() < 1.0  # zero padding shows unless both shifts are 0


def test_lpips_random_backbone_is_a_distance():
    torch.manual_seed(0)
    loss = LPIPSLoss(pretrained_backbone=False)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    d = loss(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training and torch.equal(loss(x, y), loss(x, y))  # no dropout, ever


def test_lpips_loads_a_local_vgg16_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16().features.state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    loss = LPIPSLoss(weights=str(path))
    assert torch.equal(loss.lpips.net.slice1[0].weight, features["0.weight"])
    assert torch.equal(loss.lpips.net.state_dict()["slice5.28.bias"], features["28.bias"])


def test_lpips_missing_weights_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    start = time.monotonic()
    with pytest.raises(WeightsMissingError, match="decoder.lpips_weights"):
        LPIPSLoss()
    with pytest.raises(WeightsMissingError, match="no-vgg.pth"):
        LPIPSLoss(weights=str(tmp_path / "no-vgg.pth"))
    assert time.monotonic() - start < 30  # includes importing lpips


def test_small_discriminator_gives_patch_logits_and_trains():
    torch.manual_seed(0)
    disc = build_discriminator("small")
    assert isinstance(disc, SmallDiscriminator)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    logits = disc(x)
    assert logits.shape == (3, 16)
    hinge_d_loss(disc(diff_augment(x)), disc(diff_augment(x.detach()))).backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="disc_weights"):
        build_discriminator("small", weights="d.pt")
    with pytest.raises(ValueError, match="valid"):
        build_discriminator("stylegan")


def test_dino_discriminator_frozen_backbone_trainable_heads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    disc = build_discriminator("dino", random_init=True)
    assert isinstance(disc, DinoDiscriminator)
    disc.train()
    assert not disc.backbone.training
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    logits = disc(x)
    assert logits.shape == (1, 5 * 28 * 28)  # 5 heads x 784 tokens of ViT-S/8 at 224 px
    generator_loss(logits).backward()
    assert x.grad.abs().sum() > 0  # the generator's gradient passes the frozen backbone
    assert all(p.grad is not None for p in disc.heads.parameters())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    start = time.monotonic()
    with pytest.raises(WeightsMissingError, match="decoder.gan.disc_weights"):
        build_discriminator("dino")
    with pytest.raises(WeightsMissingError, match="dino-s8.pth"):
        build_discriminator("dino", weights=str(tmp_path / "dino-s8.pth"))
    assert time.monotonic() - start < 5
