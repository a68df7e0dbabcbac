"""Flow matching: shift, time distributions, interpolation and loss (t = 0 data, t = 1 noise)."""

import math

import pytest
import torch

from rae_core.transport import Transport, shift_factor, shift_time


def test_shift_factor_of_dinov2_latents():
    assert shift_factor(256, 768) == pytest.approx(6.928, abs=1e-3)  # 256 px
    assert shift_factor(1024, 768) == pytest.approx(13.856, abs=1e-3)  # 512 px
    assert shift_factor(16, 256, base=4096) == pytest.approx(1.0)


def test_shift_time_endpoints_and_monotonicity():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 6.93):
        st = shift_time(t, s)
        assert st[0] == 0 and st[-1] == pytest.approx(1.0)
        assert (st.diff() > 0).all()
    assert torch.allclose(shift_time(t, 1.0), t)
    assert (shift_time(t[1:-1], 6.93) > t[1:-1]).all()  # s > 1 moves times towards noise
    assert shift_time(torch.tensor(0.5), 3.0) == pytest.approx(0.75)


def test_interpolation_convention_data_at_zero_noise_at_one():
    torch.manual_seed(0)
    x, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(Transport.interpolate(x, noise, torch.zeros(3)), x)
    assert torch.equal(Transport.interpolate(x, noise, torch.ones(3)), noise)
    t = torch.tensor([0.0, 0.5, 1.0])
    mid = Transport.interpolate(x, noise, t)[1]
    assert torch.allclose(mid, 0.5 * (x[1] + noise[1]))
    assert torch.equal(Transport.target(x, noise), noise - x)


def test_logit_normal_times():
    g = torch.Generator().manual_seed(0)
    t = Transport("logit_normal", shift=1.0).sample_time(20000, generator=g)
    assert t.shape == (20000,) and t.min() >= 0 and t.max() <= 0.999
    assert t.median() == pytest.approx(0.5, abs=0.02)
    logit = torch.logit(t.double())
    assert logit.std() == pytest.approx(1.0, abs=0.03)
    assert logit.mean() == pytest.approx(0.0, abs=0.03)
    # shifted: the median moves to shift_time(0.5) = s / (1 + s)
    ts = Transport("logit_normal", shift=6.93).sample_time(20000, generator=g)
    assert ts.median() == pytest.approx(6.93 / 7.93, abs=0.01)
    assert ts.max() <= shift_time(torch.tensor(0.999), 6.93) + 1e-6


def test_uniform_times_are_clipped_and_generator_reproducible():
    tr = Transport("uniform", shift=1.0)
    a = tr.sample_time(5000, generator=torch.Generator().manual_seed(3))
    b = tr.sample_time(5000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.max() <= 0.999 and a.mean() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="time_dist"):
        Transport("gaussian")


def test_loss_of_the_exact_velocity_is_zero():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 2, 2, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)

    def oracle(x_t, t, y):  # knows the data: x_t = x + t (noise - x) => velocity = (x_t - x) / t
        return (x_t - x) / t.view(-1, 1, 1, 1)

    tr = Transport("logit_normal", shift=3.0)
    assert tr.loss(oracle, x, y, generator=torch.Generator().manual_seed(0)).item() < 1e-12
    # while a zero velocity costs E|noise - x|^2 = 1 + 1 for standard-normal data
    xb = torch.randn(512, 4, 2, 2, dtype=torch.float64)
    zero = tr.loss(lambda x_t, t, y: torch.zeros_like(x_t), xb, torch.zeros(512),
                   generator=torch.Generator().manual_seed(1))
    assert zero.item() == pytest.approx(2.0, abs=0.1)


def test_loss_is_plain_mean_squared_error():
    x = torch.zeros(2, 3, 2, 2)
    tr = Transport("uniform")
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    loss = tr.loss(lambda x_t, t, y: torch.zeros_like(x_t), x, torch.zeros(2), generator=gen)
    assert math.isclose(loss.item(), noise.pow(2).mean().item(), rel_tol=1e-6)
