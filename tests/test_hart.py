"""HART's objective and generation on a micro tokenizer: the two losses train their parts, and
generation adds the residual head's output to the discrete latent (or leaves it out)."""

import pytest
import torch

from rae_core.hart import HART, generate, hart_loss, sample_tokens
from rae_core.hybrid_vq import build_tokenizer
from rae_core.models.registry import build_ar_model, reference_tokenizer
from rae_core.models.residual_head import residual_diffusion


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer = build_tokenizer("vq-micro").eval()
    vocab, channels, scales, classes = reference_tokenizer("HART-micro")
    assert (vocab, channels, scales) == (tokenizer.quantizer.vocab, tokenizer.quantizer.channels,
                                         tokenizer.quantizer.scales)
    model = build_ar_model("HART-micro", vocab, channels, scales, classes)
    with torch.no_grad():
        f = tokenizer.encode(torch.rand(16, 3, 32, 32) * 2 - 1)  # (16, C, 4, 4)
    labels = torch.arange(16) % classes
    return tokenizer.quantizer, model, f, labels


def _eval_loss(model, quantizer, f, labels, diffusion):
    model.eval()
    with torch.no_grad():
        out = hart_loss(model, quantizer, f, labels, diffusion,
                        generator=torch.Generator().manual_seed(123))
    model.train()
    return out


def test_both_losses_fall_when_hart_trains_on_a_fixed_batch(parts):
    quantizer, model, f, labels = parts
    model = build_ar_model("HART-micro", quantizer.vocab, quantizer.channels, quantizer.scales,
                           10)
    diffusion = residual_diffusion()
    scale = 3 * float(quantizer.residual(f).std())  # residuals into about [-1, 1]
    before = _eval_loss(model, quantizer, f, labels, diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        out = hart_loss(model, quantizer, f, labels, diffusion, residual_scale=scale,
                        generator=gen)
        opt.zero_grad()
        out.total.backward()
        opt.step()
    after = _eval_loss(model, quantizer, f, labels, diffusion)
    assert after.tokens < 0.7 * before.tokens
    assert after.residual < before.residual
    assert after.accuracy > before.accuracy
    assert torch.isclose(out.total, out.tokens + out.residual)  # residual_weight 1


def test_the_residual_weight_scales_only_the_head_loss(parts):
    quantizer, model, f, labels = parts
    diffusion = residual_diffusion()
    a = hart_loss(model, quantizer, f, labels, diffusion, generator=torch.Generator().manual_seed(1))
    b = hart_loss(model, quantizer, f, labels, diffusion, residual_weight=0.25,
                  generator=torch.Generator().manual_seed(1))
    assert torch.isclose(b.total, b.tokens + 0.25 * b.residual)
    assert torch.allclose(a.residual, b.residual)


def test_only_the_head_loss_trains_the_head(parts):
    quantizer, model, f, labels = parts
    out = hart_loss(model, quantizer, f, labels, residual_diffusion(),
                    generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    out.tokens.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.residual_head.parameters())
    assert model.var.head.weight.grad.abs().sum() > 0


def test_generation_adds_the_sampled_residual_to_the_discrete_latent(parts):
    quantizer, model, _, _ = parts
    labels = torch.tensor([0, 3, 7])
    torch.manual_seed(0)
    for p in model.residual_head.final.parameters():  # a trained head's output is not zero
        p.data.normal_(0, 0.5)

    def run(**kw):
        return generate(model, quantizer, labels, cfg_scale=1.5, top_k=20, top_p=0.95,
                        generator=torch.Generator().manual_seed(5), **kw)

    hybrid, again, discrete = run(), run(), run(residual=False)
    assert hybrid.shape == discrete.shape == (3, quantizer.channels, 4, 4)
    assert torch.equal(hybrid, again)  # every draw comes from the generator
    # the discrete latent is the sum of the sampled tokens' code maps
    tokens = sample_tokens(model.var, quantizer, labels, 1.5, 20, 0.95,
                           torch.Generator().manual_seed(5))
    assert torch.equal(quantizer.indices_to_f_hat(tokens.indices), discrete)
    diff = hybrid - discrete
    assert diff.abs().max() > 0 and diff.abs().max() <= 1.0 + 1e-6  # clipped x0, scale 1
    scaled = run(residual_scale=0.5)
    assert torch.allclose(scaled - discrete, 0.5 * diff, atol=1e-5)
    assert isinstance(model, HART)
