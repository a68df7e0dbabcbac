"""ODE samplers against closed-form flows; classifier-free and AutoGuidance; generate()."""

import math

import pytest
import torch
from torch import nn

from rae_core.models import build_model
from rae_core.sampling import (
    autoguidance_velocity,
    balanced_labels,
    cfg_velocity,
    conditional_velocity,
    generate,
    sample,
    time_grid,
)
from rae_core.transport import shift_time

MU, SIGMA = 2.0, 0.5


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact flow-matching velocity between data N(MU, SIGMA^2) and noise N(0, 1).

    x_t is Gaussian with mean (1 - t) MU and std s_t = sqrt((1 - t)^2 SIGMA^2 + t^2); the flow
    keeps each point's standard score, so noise z ends at MU + SIGMA z."""
    t = t.view(-1, 1, 1, 1)
    std = ((1 - t) ** 2 * SIGMA**2 + t**2).sqrt()
    d_std = (t - (1 - t) * SIGMA**2) / std
    return -MU + d_std * (x - (1 - t) * MU) / std


def _noise() -> torch.Tensor:
    return torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(50, shift=6.93)
    assert grid.shape == (51,)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert (grid.diff() < 0).all()
    assert grid[-2].item() == pytest.approx(shift_time(torch.tensor(0.001), 6.93).item())
    assert torch.equal(time_grid(1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        time_grid(0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_reach_the_gaussian_endpoint(shift):
    z = _noise()
    exact = MU + SIGMA * z
    euler = (sample(gaussian_velocity, z, 40, "euler", shift) - exact).abs().max().item()
    heun = (sample(gaussian_velocity, z, 40, "heun", shift) - exact).abs().max().item()
    assert euler < 0.1
    assert heun < 1e-3
    assert heun < euler / 20  # second order beats first order at equal steps


def test_convergence_orders_on_a_linear_field():
    a, z = 1.5, _noise()
    exact = z * math.exp(-a)  # dx/dt = a x integrated from t = 1 to 0

    def err(steps: int, method: str) -> float:
        return (sample(lambda x, t: a * x, z, steps, method) - exact).abs().max().item()

    assert err(20, "euler") / err(40, "euler") == pytest.approx(2.0, rel=0.2)
    assert err(20, "heun") / err(40, "heun") == pytest.approx(4.0, rel=0.2)


def test_sampler_evaluation_counts():
    calls = []

    def velocity(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    sample(velocity, torch.zeros(2, 1, 1, 1), steps=7, method="euler")
    assert len(calls) == 7 and calls[0] == 1.0
    calls.clear()
    sample(velocity, torch.zeros(2, 1, 1, 1), steps=7, method="heun")
    assert len(calls) == 14 and calls[-1] == 0.0
    with pytest.raises(ValueError, match="method"):
        sample(velocity, torch.zeros(1), method="rk4")


class LabelModel(nn.Module):
    """v = (y + 1) x + t, so conditional and unconditional (null label) predictions differ."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.batch_sizes: list[int] = []

    def forward(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return (y.float() + 1).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1)


def test_cfg_formula_interval_and_batching():
    model, x = LabelModel(), torch.randn(3, 2, 2, 2)
    y = torch.tensor([0, 4, 9])
    v_c = model(x, torch.full((3,), 0.5), y)
    v_u = model(x, torch.full((3,), 0.5), torch.full((3,), 10))
    model.batch_sizes.clear()
    guided = cfg_velocity(model, y, scale=2.5, interval=(0.2, 0.8))
    assert torch.allclose(guided(x, torch.full((3,), 0.5)), v_u + 2.5 * (v_c - v_u))
    assert model.batch_sizes == [6]  # cond and uncond in one pass
    # outside the interval: exactly the conditional prediction, without the unconditional pass
    assert torch.equal(guided(x, torch.full((3,), 0.9)), model(x, torch.full((3,), 0.9), y))
    assert model.batch_sizes[1] == 3
    # per sample: only the first is inside
    mixed = guided(x, torch.tensor([0.5, 0.9, 0.1]))
    assert torch.allclose(mixed[0], (v_u + 2.5 * (v_c - v_u))[0])
    assert torch.equal(mixed[1:], model(x, torch.tensor([0.5, 0.9, 0.1]), y)[1:])


def _random_head(model: nn.Module) -> nn.Module:
    """A freshly built model outputs zeros; randomise its output layer to make it informative."""
    torch.manual_seed(1)
    for p in model.final.parameters():
        nn.init.normal_(p, std=0.2)
    for block in model.body.blocks:
        nn.init.normal_(block.ada.linear.weight, std=0.2)
    return model.eval()


def test_cfg_scale_one_equals_conditional_on_a_real_model():
    torch.manual_seed(0)
    model = _random_head(build_model("DiT-micro", 64, 4, 10))
    x, t, y = torch.randn(3, 64, 4, 4), torch.full((3,), 0.4), torch.tensor([1, 2, 3])
    cond = conditional_velocity(model, y)(x, t)
    assert torch.allclose(cfg_velocity(model, y, 1.0)(x, t), cond, atol=1e-5)
    stronger = cfg_velocity(model, y, 3.0)(x, t)
    assert (stronger - cond).abs().max() > 1e-3  # guidance does something at scale != 1


def test_autoguidance():
    torch.manual_seed(0)
    good = _random_head(build_model("DiT-micro", 64, 4, 10))
    bad = _random_head(build_model("DiTDH-micro", 64, 4, 10))
    x, t, y = torch.randn(2, 64, 4, 4), torch.full((2,), 0.7), torch.tensor([0, 5])
    assert torch.allclose(autoguidance_velocity(good, bad, y, 1.0)(x, t), good(x, t, y), atol=1e-5)
    assert torch.allclose(autoguidance_velocity(good, bad, y, 0.0)(x, t), bad(x, t, y))
    v_good, v_bad = good(x, t, y), bad(x, t, y)
    assert torch.allclose(autoguidance_velocity(good, bad, y, 1.42)(x, t),
                          v_bad + 1.42 * (v_good - v_bad), atol=1e-5)


def test_balanced_labels():
    y = balanced_labels(3, 4)
    assert y.dtype == torch.long
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(torch.bincount(balanced_labels(50, 1000)), torch.full((1000,), 50))


def test_generate_from_a_zero_initialised_model_returns_its_noise():
    model = build_model("DiT-micro", 64, 4, 10)  # zero velocity everywhere at init
    y = balanced_labels(2, 3)
    z = generate(model, y, (64, 4, 4), steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(z, torch.randn(6, 64, 4, 4, generator=torch.Generator().manual_seed(7)))


def test_generate_samples_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = _random_head(build_model("DiT-micro", 64, 4, 10, label_dropout=1.0)).train()
    y = torch.tensor([1, 2])
    z = generate(model, y, [64, 4, 4], steps=4, method="heun", guidance="cfg", scale=2.0,
                 generator=torch.Generator().manual_seed(0))
    assert model.training and not z.requires_grad
    model.eval()  # label dropout 1.0 would have erased every label had it stayed in train mode
    noise = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, sample(cfg_velocity(model, y, 2.0), noise, 4, "heun"), atol=1e-5)
    assert z.shape == (2, 64, 4, 4) and torch.isfinite(z).all()


def test_generate_autoguidance_needs_a_weak_model():
    model = build_model("DiT-micro", 64, 4, 10)
    with pytest.raises(ValueError, match="weak_model"):
        generate(model, torch.tensor([0]), (64, 4, 4), steps=2, guidance="autoguidance")
    with pytest.raises(ValueError, match="guidance"):
        generate(model, torch.tensor([0]), (64, 4, 4), steps=2, guidance="cgf")
    weak = build_model("DiT-micro", 64, 4, 10)
    z = generate(model, torch.tensor([0, 1]), (64, 4, 4), steps=2, guidance="autoguidance",
                 scale=1.5, weak_model=weak)
    assert z.shape == (2, 64, 4, 4)
