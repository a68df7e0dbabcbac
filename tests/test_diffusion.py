"""IDDPM diffusion: schedule, bound terms, respacing, the hybrid loss, DDPM / DDIM samplers
against a Gaussian target with a closed-form epsilon, classifier-free guidance, generate()."""

import math

import pytest
import torch
from torch import nn

from rae_core.diffusion import (
    GaussianDiffusion,
    cfg_output,
    discretized_gaussian_log_likelihood,
    generate,
    normal_kl,
    sample,
)
from rae_core.models import build_model

MU, SIGMA = 1.5, 0.5  # the data: every element ~ N(MU, SIGMA^2)
BASE = GaussianDiffusion()


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_eps(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for Gaussian data: x_t ~ N(a MU, a^2 SIGMA^2 + b^2), a = sqrt(abar_t)."""
    ab = BASE.alphas_cumprod[step.cpu()].float().view(-1, 1, 1, 1)
    return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * SIGMA**2 + 1 - ab)


def exact_eps_and_variance(diffusion: GaussianDiffusion):
    """Epsilon plus the v that gives the exact reverse variance Var(x_{i-1} | x_i) =
    V_{i-1} beta_i / V_i (V the marginal variance), so ancestral sampling is exact."""

    def output(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        i = torch.searchsorted(diffusion.timestep_map, step.cpu())
        ab, ab_prev, beta = (diffusion.alphas_cumprod[i], diffusion.alphas_cumprod_prev[i],
                             diffusion.betas[i])
        var = (ab_prev * SIGMA**2 + 1 - ab_prev) * beta / (ab * SIGMA**2 + 1 - ab)
        lo, hi = diffusion.posterior_log_variance_clipped[i], beta.log()
        v = 2 * ((var.log() - lo) / (hi - lo)).clamp(0, 1) - 1
        return torch.cat([exact_eps(x, step), v.float().view(-1, 1, 1, 1).expand_as(x)], dim=1)

    return output


def _noise(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 2, 2, generator=g), g


def test_linear_schedule():
    assert BASE.num_timesteps == 1000
    assert BASE.betas[0].item() == pytest.approx(1e-4) and BASE.betas[-1].item() == 0.02
    assert BASE.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    # beta-tilde is 0 at t = 0; its log is clipped to beta-tilde_1 there
    assert BASE.posterior_variance[0] == 0
    assert BASE.posterior_log_variance_clipped[0] == BASE.posterior_variance[1].log()
    assert torch.all(BASE.posterior_variance[1:] < BASE.betas[1:])


def test_normal_kl_is_the_closed_form():
    m1, s1, m2, s2 = torch.tensor(0.3), torch.tensor(0.7), torch.tensor(-1.0), torch.tensor(1.9)
    kl = normal_kl(m1, 2 * s1.log(), m2, 2 * s2.log())
    closed = torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert kl.item() == pytest.approx(closed.item(), rel=1e-6)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1),
                                            torch.distributions.Normal(m2, s2))
    assert kl.item() == pytest.approx(ref.item(), rel=1e-6)


def test_bound_term_in_bits():
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 999])
    x_t = BASE.q_sample(x0, t, noise)
    # the true epsilon gives the true posterior mean: v = -1 (beta-tilde) leaves a zero KL,
    # v = +1 (beta) the KL between two variances only
    low = BASE.vb_bits(torch.cat([noise, -torch.ones_like(noise)], 1), x0, x_t, t)
    assert torch.allclose(low, torch.zeros(3), atol=1e-5)
    high = BASE.vb_bits(torch.cat([noise, torch.ones_like(noise)], 1), x0, x_t, t)
    r = (BASE.posterior_variance[t] / BASE.betas[t]).float()
    assert torch.allclose(high, 0.5 * (r - 1 - r.log()) / math.log(2), rtol=1e-4)
    # t = 0: the decoder's NLL of x_0 in a bin of width 2/255 around it
    x0 = torch.full((1, 4, 2, 2), 0.2)
    mean, log_var, _ = BASE.p_mean_variance(torch.zeros(1, 8, 2, 2), x0, torch.tensor([0]))
    nll = BASE.vb_bits(torch.zeros(1, 8, 2, 2), x0, x0, torch.tensor([0]))
    normal = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    p = normal.cdf(x0 + 1 / 255) - normal.cdf(x0 - 1 / 255)
    assert nll.item() == pytest.approx((-p.log().mean() / math.log(2)).item(), rel=1e-4)
    # the outermost bin is open-ended
    top = discretized_gaussian_log_likelihood(torch.tensor([1.0]), torch.tensor([0.0]),
                                              torch.tensor([0.0])).exp().item()
    assert top == pytest.approx(1 - torch.special.ndtr(torch.tensor(1 - 1 / 255)).item())


def test_respacing_keeps_the_marginals():
    d = BASE.respaced(250)
    steps = d.timestep_map
    assert d.num_timesteps == 250 and steps[0] == 0 and steps[-1] == 999
    assert set(steps.diff().tolist()) <= {4, 5}  # evenly spaced
    # IDDPM sums the stride 49.95: its 10th step is 499 (499.4999...), not round(499.5) = 500
    assert BASE.respaced(21).timestep_map[10] == 499
    assert torch.allclose(d.alphas_cumprod, BASE.alphas_cumprod[steps], rtol=1e-12)
    x0, noise = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    i = torch.tensor([0, 1, 50, 100, 200, 249])
    assert torch.allclose(d.q_sample(x0, i, noise), BASE.q_sample(x0, steps[i], noise))
    assert torch.allclose(BASE.respaced(1000).betas, BASE.betas, rtol=1e-12)
    twice = BASE.respaced(250).respaced(50)
    assert torch.allclose(twice.alphas_cumprod, BASE.alphas_cumprod[twice.timestep_map])
    with pytest.raises(ValueError, match="steps"):
        BASE.respaced(1)


def test_ddpm_with_learned_variance_samples_the_gaussian_exactly():
    d = BASE.respaced(50)
    z, g = _noise()
    x = sample(exact_eps_and_variance(d), z, d, "ddpm", generator=g)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.02)


def test_ddpm_with_fixed_variance_samples_the_gaussian():
    z, g = _noise()
    x = sample(exact_eps, z, BASE.respaced(250), "ddpm", generator=g)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.02)


def test_ddim_samples_the_gaussian():
    z, g = _noise()
    x = sample(exact_eps, z, BASE.respaced(250), "ddim", generator=g)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.02)
    # deterministic: the same noise gives the same samples, without the generator
    assert torch.equal(x, sample(exact_eps, z, BASE.respaced(250), "ddim"))


def test_ddim_with_eta_one_is_ancestral_sampling_with_beta_tilde():
    d, x_t, noise = BASE.respaced(20), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    eps = exact_eps(x_t, d.timestep_map[[7, 7, 7]])
    lowest = torch.cat([eps, -torch.ones_like(eps)], 1)  # v = -1: variance beta-tilde
    assert torch.allclose(d.ddim_step(eps, x_t, 7, eta=1.0, noise=noise),
                          d.ddpm_step(lowest, x_t, 7, noise), atol=1e-5)


def test_ddim_from_the_true_x0_and_eps_is_exact():
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    d = BASE.respaced(20)
    x_t = d.q_sample(x0, torch.tensor([10, 10]), noise)
    x_prev = d.ddim_step(noise, x_t, 10, eta=0.0, noise=None)
    assert torch.allclose(x_prev, d.q_sample(x0, torch.tensor([9, 9]), noise), atol=1e-5)


def _random_model(**kwargs) -> nn.Module:
    """DiT-micro/2 with a random output layer (a fresh one outputs zeros)."""
    torch.manual_seed(0)
    model = build_model("DiT-micro/2", 4, 8, 10, **kwargs)
    for p in model.final.parameters():
        nn.init.normal_(p, std=0.2)
    return model.eval()


def test_cfg_scale_one_is_the_conditional_output():
    model = _random_model()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    cond = model(x, t, y)
    for channels in ("all", "first3"):
        assert torch.allclose(cfg_output(model, y, 1.0, channels)(x, t), cond, atol=1e-5)
    uncond = model(x, t, torch.full_like(y, 10))
    guided = cfg_output(model, y, 4.0)(x, t)
    assert torch.allclose(guided[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]),
                          atol=1e-4)
    assert torch.allclose(guided[:, 4:], cond[:, 4:], atol=1e-5)  # variance: conditional


def test_cfg_first3_guides_three_channels_only():
    model = _random_model()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    guided = cfg_output(model, y, 4.0, "first3")(x, t)
    assert torch.allclose(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]),
                          atol=1e-4)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-5)  # channel 4 and variance
    assert (guided[:, :3] - cond[:, :3]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="cfg_channels"):
        cfg_output(model, y, 4.0, "first4")


class CountingModel(nn.Module):
    """Exact epsilon for the Gaussian target, whatever the label; records its batch sizes."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.batches: list[int] = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return exact_eps(x, t)


def test_generate_batches_cfg_and_restores_the_mode():
    model = CountingModel().train()
    y = torch.tensor([0, 1])
    z = generate(model, y, (1, 2, 2), steps=10, guidance="cfg", scale=3.0,
                 generator=torch.Generator().manual_seed(3))
    assert model.batches == [4] * 10  # one [cond, uncond] pass a step
    assert model.training and z.shape == (2, 1, 2, 2) and torch.isfinite(z).all()
    again = generate(model, y, (1, 2, 2), steps=10, guidance="cfg", scale=3.0,
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, again)


def test_generate_is_sample_on_the_respaced_diffusion():
    model = _random_model(label_dropout=1.0).train()
    y = torch.tensor([1, 2])
    z = generate(model, y, (4, 8, 8), steps=5, method="ddim",
                 generator=torch.Generator().manual_seed(0))
    model.eval()  # label dropout 1.0 would have erased every label had it stayed in train mode
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = sample(lambda x, t: model(x, t, y), noise, BASE.respaced(5), "ddim")
    assert torch.allclose(z, expected, atol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        generate(model, y, (4, 8, 8), steps=5, guidance="cgf")
    with pytest.raises(ValueError, match="method"):
        generate(model, y, (4, 8, 8), steps=5, method="euler")


def test_hybrid_loss_stops_the_bound_gradient_at_epsilon():
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([0, 3, 400, 999])
    out = nn.Parameter(torch.randn(4, 8, 2, 2) * 0.5)
    loss = BASE.training_loss(lambda x, s, y: out, x0, None, t=t, noise=noise)
    loss.backward()
    x_t = BASE.q_sample(x0, t, noise)
    mse = (out[:, :4] - noise).pow(2).mean(dim=(1, 2, 3))
    vb = BASE.vb_bits(out.detach(), x0, x_t, t)
    assert loss.item() == pytest.approx((mse + vb).mean().item(), rel=1e-6)
    # the epsilon channels are trained by the MSE alone, the variance channels by the bound
    assert torch.allclose(out.grad[:, :4], 2 * (out[:, :4] - noise).detach() / (4 * 16))
    assert out.grad[:, 4:].abs().sum() > 0


def test_hybrid_loss_trains_a_tiny_dit():
    torch.manual_seed(0)
    x0, y = torch.randn(8, 4, 8, 8), torch.arange(8) % 4
    model = build_model("DiT-micro/2", 4, 8, 4, label_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)

    @torch.no_grad()
    def evaluate() -> float:  # fixed steps and noise over 16 copies of the batch
        return BASE.training_loss(model, x0.repeat(16, 1, 1, 1), y.repeat(16),
                                  generator=torch.Generator().manual_seed(2)).item()

    before = evaluate()
    for _ in range(150):
        loss = BASE.training_loss(model, x0.repeat(4, 1, 1, 1), y.repeat(4), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert before > 0.9  # the zero-initialised model predicts epsilon = 0: MSE 1
    assert after < 0.35 * before
