"""The generator families behind one interface (rae_core.generator): objective, sampling and
the configuration checks that keep a kind and its sampler together."""

import pytest
import torch

from rae_core.errors import ConfigError
from rae_core.generator import build_generator, objective, sample_latents
from rae_core.presets import load_config

SHAPE = (4, 8, 8)  # a slim VAE's latent of a 32-px image


@pytest.mark.parametrize("kind, model, sampler", [("flow", "DiTDH-tiny/2", "euler"),
                                                  ("ddpm", "DiT-micro/2", "ddpm"),
                                                  ("ddpm", "DiT-micro/2", "ddim")])
def test_each_kind_trains_and_samples_through_the_same_calls(kind, model, sampler):
    cfg = load_config(None, "smoke", [f"generator.kind={kind}", f"generator.model={model}",
                                      f"sample.sampler={sampler}", "sample.steps=8"])
    torch.manual_seed(0)
    net = build_generator(cfg, SHAPE)
    fn = objective(cfg, SHAPE)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, *SHAPE, generator=g), torch.arange(6) % 10
    t = fn.sample_time(6, generator=g)
    assert t.shape == (6,)
    if kind == "ddpm":
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000
    loss = fn.loss(net, x, y, noise=torch.randn(6, *SHAPE, generator=g), t=t)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    runs = [sample_latents(cfg, net, y, SHAPE, noise, generator=torch.Generator().manual_seed(2))
            for _ in range(2)]
    assert runs[0].shape == (6, *SHAPE) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])  # the same draws give the same latents


def test_a_sampler_of_the_other_kind_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="sample.sampler: 'euler' is not valid with "
                                          "generator.kind=ddpm; expected one of ddpm, ddim"):
        load_config(None, "smoke", ["generator.kind=ddpm", "generator.model=DiT-micro/2"])
    with pytest.raises(ConfigError, match="autoguidance"):
        load_config(None, "smoke-vae", ["sample.guidance=autoguidance"])


def test_a_model_of_the_other_kind_is_refused_by_the_registry_check():
    from rae_core.validate import check_registries

    cfg = load_config(None, "smoke", ["generator.kind=ddpm", "sample.sampler=ddpm"])
    with pytest.raises(ConfigError, match="generator.model: 'DiTDH-micro' is not a model of "
                                          "generator.kind=ddpm"):
        check_registries(cfg)
