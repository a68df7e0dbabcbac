"""Gaussian diffusion as IDDPM defines it and DiT trains with it: epsilon prediction, learned
variance, the hybrid loss, respacing, and DDPM / DDIM sampling with classifier-free guidance.

Steps t = 0 .. T-1 (T = 1000), t = 0 nearly data, T-1 nearly noise; linear betas 1e-4 .. 0.02:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),    abar_t = prod_{s <= t} (1 - beta_s).
The model maps (x_t, t, y) to C channels of epsilon and, with learned sigma, C channels v in
[-1, 1] that place the reverse variance between the posterior's beta-tilde_t and beta_t in log
space. The loss is IDDPM's hybrid: MSE(epsilon) plus the variational-bound term of step t (the
KL between the true posterior and the model's, in bits; the decoder NLL at t = 0) computed with
epsilon frozen, so the bound trains only the variance. DiT's loss type is plain MSE, under which
IDDPM leaves the bound unscaled (its RESCALED_MSE multiplies it by T / 1000, which is 1 here).

The samples may be images (B, C, H, W) or vectors (B, C): every per-sample mean runs over all
but the batch axis, and y is passed to the model as it is, class labels (B,) or a per-row
condition (B, D). MAR's and HART's residual head, a diffusion over token vectors, uses the
cosine schedule (`cosine_betas`) instead of the linear one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from rae_core.transport import randn_on_generator

OutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """DDPM's schedule (float64); other T scale it by 1000 / T, as IDDPM does."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (float64): abar(t) = f(t) / f(0) with
    f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), s = 0.008, as betas 1 - abar_{i+1} / abar_i,
    capped at 0.999 (abar reaches 0 at t = T, where beta would be 1)."""
    s = 0.008
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """(B,) means over every axis but the batch: (B, C, H, W) images or (B, C) vectors."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element of a Gaussian discretised into bins of width 2/255 (8-bit pixels
    in [-1, 1]), the outermost bins open-ended. DiT applies it to latents unchanged."""
    centered = (x - mean) * torch.exp(-log_scale)
    half_bin = torch.exp(-log_scale) / 255.0
    cdf_plus = torch.special.ndtr(centered + half_bin)
    cdf_min = torch.special.ndtr(centered - half_bin)
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_below = torch.log(cdf_plus.clamp(min=1e-12))
    log_above = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, log_bin))


class GaussianDiffusion:
    """A diffusion over `betas` (default: DiT's 1000 linear ones). `timestep_map[i]` is the
    original step fed to the model at index i: the identity, or the kept steps of `respaced`."""

    def __init__(self, betas: torch.Tensor | None = None,
                 timestep_map: torch.Tensor | None = None):
        betas = linear_betas() if betas is None else betas.to(torch.float64)
        if betas.dim() != 1 or len(betas) < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1]")
        self.num_timesteps = T = len(betas)
        self.timestep_map = torch.arange(T) if timestep_map is None else timestep_map
        self.betas = betas
        self.alphas_cumprod = ab = torch.cumprod(1.0 - betas, dim=0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.alphas_cumprod_prev = ab_prev
        self.posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)  # beta-tilde, 0 at t = 0
        # ... so its log is clipped there to the value at t = 1, as IDDPM does
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * ab_prev.sqrt() / (1.0 - ab)  # of x_0
        self.posterior_mean_coef2 = (1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab)  # of x_t
        # the fixed variance of a model without learned sigma: beta_t ("fixed large", DiT's
        # choice), with beta-tilde_1 at t = 0 as in IDDPM
        self.fixed_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))

    def respaced(self, steps: int) -> GaussianDiffusion:
        """The diffusion over `steps` evenly spaced steps (the first and the last included), with
        betas recomputed from the kept alpha-bars, so q(x_t | x_0) is unchanged at each."""
        if not 2 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [2, {self.num_timesteps}], got {steps}")
        stride, position, kept = (self.num_timesteps - 1) / (steps - 1), 0.0, []
        for _ in range(steps):  # summed as IDDPM does: i * stride would round some ties apart
            kept.append(round(position))
            position += stride
        kept = torch.tensor(kept)
        ab = self.alphas_cumprod[kept]
        betas = 1.0 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
        return GaussianDiffusion(betas, self.timestep_map[kept])

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """(batch,) integer steps, uniform over 0 .. T-1, drawn on the generator's device."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, ...) to broadcast over x, in fp32 on x's device."""
        values = table[t.cpu()].to(device=x.device, dtype=torch.float32)  # no-op .cpu() for CPU t
        return values.view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x0
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's reverse step p(x_{t-1} | x_t) from its output (B, C or 2C, ...): mean,
        log variance and the predicted x_0. Learned sigma is read from the 2C channels."""
        c = x_t.shape[1]
        eps = out[:, :c]
        if out.shape[1] == 2 * c:
            frac = (out[:, c:] + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_var = (frac * self._at(self.betas.log(), t, x_t)
                       + (1 - frac) * self._at(self.posterior_log_variance_clipped, t, x_t))
        else:
            log_var = self._at(self.fixed_log_variance, t, x_t).expand_as(x_t)
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0

    def vb_bits(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        """(B,) variational-bound term of step t in bits per dimension: the KL between the true
        posterior and the model's for t > 0, the decoder's NLL of x_0 at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _ = self.p_mean_variance(out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
        return torch.where(t.to(kl.device) == 0, nll, kl) / math.log(2.0)

    def training_loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The hybrid loss, averaged over the batch: MSE(epsilon) per sample, plus the bound
        term with epsilon detached when the model learns sigma.

        `t` (integer indices into this diffusion) and `noise` may be drawn by the caller (for
        the whole batch before it is split into accumulation micro-batches). The schedule is
        looked up where t lies: CPU steps spare a GPU run a device-to-host copy."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator)
        if noise is None:
            noise = randn_on_generator(tuple(x0.shape), x0.device, generator).to(x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.timestep_map[t.cpu()].to(x0.device), y).float()
        c = x0.shape[1]
        loss = _mean_flat((out[:, :c] - noise.float()).pow(2))
        if out.shape[1] == 2 * c:
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            loss = loss + self.vb_bits(frozen, x0.float(), x_t.float(), t)
        return loss.mean()

    def ddpm_step(self, out: torch.Tensor, x_t: torch.Tensor, t: int, noise: torch.Tensor | None,
                  clip_denoised: bool = False) -> torch.Tensor:
        """Ancestral step x_t -> x_{t-1}: the model's mean plus its standard deviation times
        `noise` (none at t = 0, which returns the mean)."""
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
        mean, log_var, _ = self.p_mean_variance(out, x_t, tt, clip_denoised)
        return mean if t == 0 else mean + torch.exp(0.5 * log_var) * noise

    def ddim_step(self, out: torch.Tensor, x_t: torch.Tensor, t: int, eta: float,
                  noise: torch.Tensor | None, clip_denoised: bool = False) -> torch.Tensor:
        """DDIM step x_t -> x_{t-1}: deterministic for eta = 0, DDPM-like noise for eta = 1."""
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
        _, _, x0 = self.p_mean_variance(out, x_t, tt, clip_denoised)
        ab, ab_prev = self.alphas_cumprod[t].item(), self.alphas_cumprod_prev[t].item()
        eps = (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)  # consistent with a clipped x_0
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps
        return x if t == 0 or sigma == 0 else x + sigma * noise


def sample(output_fn: OutputFn, noise: torch.Tensor, diffusion: GaussianDiffusion,
           method: Literal["ddpm", "ddim"] = "ddpm", eta: float = 0.0,
           generator: torch.Generator | None = None, clip_denoised: bool = False,
           temperature: float = 1.0) -> torch.Tensor:
    """Run the reverse process from x_{T-1} = noise to x_0 over every step of `diffusion`
    (respace it first). `output_fn(x, step)` gets the original steps of `timestep_map`; the
    step noise is drawn on the generator's device and scaled by `temperature` (MAR's knob:
    below 1 sharpens the samples; the starting noise is left as given)."""
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method {method!r} is not one of ddpm, ddim")
    x = noise
    for i in reversed(range(diffusion.num_timesteps)):
        step = torch.full((x.shape[0],), int(diffusion.timestep_map[i]), device=x.device)
        out = output_fn(x, step)
        needs_noise = i > 0 and (method == "ddpm" or eta > 0)
        z = (temperature * randn_on_generator(tuple(x.shape), x.device, generator).to(x.dtype)
             if needs_noise else None)
        if method == "ddpm":
            x = diffusion.ddpm_step(out, x, i, z, clip_denoised)
        else:
            x = diffusion.ddim_step(out, x, i, eta, z, clip_denoised)
    return x


def cfg_output(model: nn.Module, y: torch.Tensor, scale: float,
               cfg_channels: Literal["all", "first3"] = "all") -> OutputFn:
    """Classifier-free guidance on epsilon, eps_u + s (eps_c - eps_u), from one batched pass
    of [cond, uncond]; the variance channels are the conditional pass's. "first3" guides only
    channels 0-2, as DiT's sampler does; channel 3 then also stays conditional."""
    if cfg_channels not in ("all", "first3"):
        raise ValueError(f"cfg_channels {cfg_channels!r} is not one of all, first3")
    null = torch.full_like(y, model.num_classes)

    def output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        k = x.shape[1] if cfg_channels == "all" else 3
        guided = out_u[:, :k] + scale * (out_c[:, :k] - out_u[:, :k])
        return torch.cat([guided, out_c[:, k:]], dim=1)

    return output


@torch.no_grad()
def generate(model: nn.Module, y: torch.Tensor, latent_shape: Sequence[int],
             diffusion: GaussianDiffusion | None = None, steps: int = 250,
             method: Literal["ddpm", "ddim"] = "ddpm", guidance: Literal["none", "cfg"] = "none",
             scale: float = 1.5, cfg_channels: Literal["all", "first3"] = "all", eta: float = 0.0,
             clip_denoised: bool = False, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents (B, C, H, W) for labels y (B,), on the model's device, from `diffusion`
    (default: DiT's 1000 linear steps) respaced to `steps`.

    Models run in eval mode (no label dropout) and are put back in their previous mode. Noise
    is drawn on the generator's device, so a CPU generator gives the same samples on any
    device; or the starting noise is given (drawn once per shard, so batching does not change
    it). Latents are not clipped unless `clip_denoised` (that is for pixels in [-1, 1]).
    """
    device = next(model.parameters()).device
    y = y.to(device)
    if guidance == "none":
        output_fn = lambda x, t: model(x, t, y)  # noqa: E731
    elif guidance == "cfg":
        output_fn = cfg_output(model, y, scale, cfg_channels)
    else:
        raise ValueError(f"guidance {guidance!r} is not one of none, cfg")
    respaced = (diffusion or GaussianDiffusion()).respaced(steps)
    if noise is None:
        noise = randn_on_generator((y.shape[0], *latent_shape), device, generator)
    noise = noise.to(device)
    mode = model.training
    try:
        model.eval()
        return sample(output_fn, noise, respaced, method, eta, generator, clip_denoised)
    finally:
        model.train(mode)
