"""HART's residual diffusion head: its size, zero initialisation, the cosine schedule, the masked
hybrid loss on vectors, and 8-step sampling of a conditional Gaussian after a short training."""

import math

import pytest
import torch
from torch import nn

from rae_core.diffusion import GaussianDiffusion, cosine_betas, sample
from rae_core.models.residual_head import (
    ResidualHead,
    residual_diffusion,
    residual_loss,
    sample_residual,
)

# three conditions (one-hot), each a 2-D Gaussian with its own mean and per-axis std
MEANS = torch.tensor([[-0.5, 0.3], [0.5, 0.3], [0.0, -0.5]])
STDS = torch.tensor([[0.2, 0.1], [0.1, 0.3], [0.3, 0.2]])


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hart_d20_head_has_the_papers_size():
    with torch.device("meta"):
        head = ResidualHead(32, 1280)  # HART-d20: width 64 x 20, 32 latent channels
    count = sum(p.numel() for p in head.parameters())
    assert abs(count - 36.1e6) / 36.1e6 < 0.01
    assert count == 36_323_392


def test_zero_init_output_is_exactly_zero_because_of_the_final_linear():
    torch.manual_seed(0)
    head = ResidualHead(4, 6, width=32, depth=2)
    x, t, c = torch.randn(5, 4), torch.tensor([0, 10, 500, 900, 999]), torch.randn(5, 6)
    assert torch.equal(head(x, t, c), torch.zeros(5, 8))
    # every adaLN made random: still exactly 0, the zero final Linear guarantees it alone
    for module in [b.ada for b in head.blocks] + [head.final_ada]:
        nn.init.normal_(module.linear.weight)
    assert torch.equal(head(x, t, c), torch.zeros(5, 8))
    nn.init.normal_(head.final.weight)
    assert head(x, t, c).abs().min() > 0


def test_cosine_betas_give_the_closed_form_alpha_bar():
    T, s = 1000, 0.008
    d = GaussianDiffusion(cosine_betas(T))

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # index i is step t = i + 1 of Nichol & Dhariwal's continuous-time abar
    for t in (1, 10, 250, 500, 900, 990):
        assert d.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert d.betas.max().item() == 0.999 and d.betas[-1].item() == 0.999  # capped at t = T
    assert (d.betas[:-1] < 0.999).all()


def test_masked_loss_ignores_the_unmasked_rows():
    torch.manual_seed(0)
    head = ResidualHead(3, 5, width=32, depth=2)
    nn.init.normal_(head.final.weight, std=0.1)  # a head with a nonzero output
    d = residual_diffusion()
    target, cond = torch.randn(10, 3), torch.randn(10, 5)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)

    def loss(target, cond, mask):
        return residual_loss(head, d, target, cond, mask, torch.Generator().manual_seed(1))

    base = loss(target, cond, mask)
    other_t, other_c = target.clone(), cond.clone()
    other_t[~mask], other_c[~mask] = 10 * torch.randn(4, 3), torch.randn(4, 5)
    assert loss(other_t, other_c, mask) == base
    # a masked row does count, and the loss is the mean over the masked rows alone
    changed = target.clone()
    changed[0] += 1.0
    assert loss(changed, cond, mask) != base
    assert loss(target[mask], cond[mask], None) == base
    with pytest.raises(ValueError, match="no rows"):
        loss(target, cond, torch.zeros(10, dtype=torch.bool))


def _sample_errors(head: ResidualHead) -> tuple[float, float]:
    """Mean absolute error of the per-condition mean and std of 8-step samples."""
    k = torch.arange(3).repeat_interleave(2000)
    x = sample_residual(head, torch.eye(3)[k], generator=torch.Generator().manual_seed(5))
    means = torch.stack([x[k == i].mean(0) for i in range(3)])
    stds = torch.stack([x[k == i].std(0) for i in range(3)])
    return (means - MEANS).abs().mean().item(), (stds - STDS).abs().mean().item()


def test_eight_step_sampler_learns_a_conditional_gaussian():
    torch.manual_seed(0)
    head = ResidualHead(2, 3, width=128, depth=2)
    mean_before, std_before = _sample_errors(head)
    d = residual_diffusion()
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(10)
    for _ in range(400):
        k = torch.randint(0, 3, (256,), generator=g)
        target = MEANS[k] + STDS[k] * torch.randn(256, 2, generator=g)
        loss = residual_loss(head, d, target, torch.eye(3)[k], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean_after, std_after = _sample_errors(head)
    # untrained 0.35 and 0.58; trained 0.01 and 0.10. The std stays ~0.1 too wide: the first
    # of the 8 steps starts at t = 999, where x_0 is clipped guesswork (see sample_residual).
    assert mean_after < 0.15 * mean_before
    assert std_after < 0.3 * std_before


def test_temperature_scales_the_step_noise_only():
    head = ResidualHead(2, 3, width=16, depth=1)
    cond, noise = torch.eye(3), torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    d = residual_diffusion().respaced(8)

    def run(temperature: float, seed: int) -> torch.Tensor:
        return sample(lambda x, t: head(x, t, cond), noise, d, clip_denoised=True,
                      generator=torch.Generator().manual_seed(seed), temperature=temperature)

    assert torch.equal(run(0.0, 1), run(0.0, 2))  # no step noise: the generator is unused
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
