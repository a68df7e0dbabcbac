"""The HART family as the stages see it: config rules, the tokenizer's encoder/decoder halves
and their weights files, the scale-wise generator's checkpoint, objective and sampling."""

import pytest
import torch

from rae_core.config import from_dict
from rae_core.errors import ConfigError, DataError, WeightsMissingError
from rae_core.generator import (
    ScalewiseObjective,
    build_generator,
    checkpoint_meta,
    load_generator,
    sample_latents,
)
from rae_core.hybrid_vq import (
    HybridTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_config,
    tokenizer_parts,
)
from rae_core.presets import load_config
from rae_core.store import atomic_save
from rae_core.validate import check_registries

HART = {"autoencoder": {"kind": "hybrid-vq"}, "encoder": {"name": "vq-micro"},
        "generator": {"kind": "hart", "model": "HART-micro"}, "sample": {"sampler": "scalewise"}}


def _cfg(**sections):
    data = {k: dict(v) for k, v in HART.items()}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return from_dict(data)


def test_hart_and_hybrid_vq_only_come_together():
    _cfg()
    with pytest.raises(ConfigError, match="generator.kind: 'flow'.*hybrid-vq"):
        _cfg(generator={"kind": "flow", "model": "DiTDH-micro"}, sample={"sampler": "euler"})
    with pytest.raises(ConfigError, match="generator.kind: 'hart'.*autoencoder.kind=rae"):
        _cfg(autoencoder={"kind": "rae"}, encoder={"name": "mae-micro"})


@pytest.mark.parametrize("bad, message", [
    ({"sample": {"sampler": "euler"}}, "sample.sampler: 'euler'.*scalewise"),
    ({"sample": {"guidance": "autoguidance", "weak_model": "x.pt"}}, "autoguidance"),
    ({"generator": {"mask_ratio": [0.9, 0.5]}}, "generator.mask_ratio"),
    ({"autoencoder": {"hybrid_prob": 1.5}}, "autoencoder.hybrid_prob"),
])
def test_bad_hart_settings_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**bad)


def test_tokenizer_overrides_reach_the_tokenizer_and_bad_scales_are_named():
    cfg = _cfg(autoencoder={"vocab": 32, "channels": 4, "scales": [1, 2, 4]})
    from rae_core.autoencoder import latent_shape, tokenizer_config

    tok = tokenizer_config(cfg)
    assert (tok.vocab, tok.z_channels, tok.scales) == (32, 4, (1, 2, 4))
    assert latent_shape(cfg) == (4, 4, 4)
    check_registries(cfg)
    with pytest.raises(ConfigError, match="autoencoder.scales|last scale"):
        check_registries(_cfg(autoencoder={"scales": [1, 2, 3]}))
    with pytest.raises(ConfigError, match="autoencoder.scales"):
        check_registries(_cfg(autoencoder={"scales": [2, 1, 4]}))
    with pytest.raises(ConfigError, match="generator.model: 'DiT-micro/2'.*HART-micro"):
        check_registries(_cfg(generator={"model": "DiT-micro/2"}))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    torch.manual_seed(0)
    tok = HybridTokenizer(tokenizer_config("vq-micro"))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.pt"
    save_tokenizer(tok, "vq-micro", path)
    return tok, path


def test_tokenizer_weights_round_trip_and_fail_fast(tokenizer_file, tmp_path):
    tok, path = tokenizer_file
    again = load_tokenizer("vq-micro", tokenizer_config("vq-micro"), path)
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    with pytest.raises(WeightsMissingError, match="encoder.weights: .*missing.pt not found"):
        load_tokenizer("vq-micro", tokenizer_config("vq-micro"), tmp_path / "missing.pt")
    with pytest.raises(DataError, match="does not hold vq-micro tokenizer weights of vocab 32"):
        load_tokenizer("vq-micro", tokenizer_config("vq-micro", vocab=32), path)
    encoder, _ = tokenizer_parts("vq-micro", tokenizer_config("vq-micro"), path)
    assert encoder.identity()["weights_sha256"] and encoder.identity()["vocab"] == 64


def test_the_encoder_half_gives_the_tokenizers_latent(tokenizer_file):
    tok, path = tokenizer_file
    encoder, _ = tokenizer_parts("vq-micro", tokenizer_config("vq-micro"), path)
    x = torch.rand(3, 3, 32, 32)
    assert encoder.latent_shape == (8, 4, 4)
    torch.testing.assert_close(encoder.encode(x), tok.encode(x * 2 - 1))


def test_decoder_half_mixes_hybrid_and_discrete_latents_only_in_training(tokenizer_file):
    _, path = tokenizer_file
    encoder, decoder = tokenizer_parts("vq-micro", tokenizer_config("vq-micro"), path,
                                       hybrid_prob=0.5)
    f = encoder.encode(torch.rand(64, 3, 32, 32))
    discrete = decoder.discrete(f)
    torch.testing.assert_close(discrete + encoder.quantizer.residual(f), f)
    with torch.no_grad():
        from_f, from_tokens = decoder(f), decoder(discrete)  # eval: what it is given
        decoder.train()
        torch.manual_seed(3)
        mixed = decoder(f)
    is_f = (mixed - from_f).flatten(1).abs().amax(1) < 1e-5
    is_tokens = (mixed - from_tokens).flatten(1).abs().amax(1) < 1e-5
    assert bool((is_f ^ is_tokens).all())  # every sample is one or the other
    assert 16 < int(is_f.sum()) < 48  # about half each
    assert not any(p.requires_grad for p in decoder.quantizer.parameters())
    assert decoder.last_layer_weight.requires_grad


def _tokens(tokenizer_file, scale=0.5):
    import copy

    return copy.deepcopy(tokenizer_file[0].quantizer), scale


@pytest.mark.parametrize("model", ["HART-micro", "VAR-micro"])
def test_checkpoint_rebuilds_the_same_sampler(tokenizer_file, tmp_path, model):
    cfg = _cfg(generator={"model": model}, sample={"steps": 4, "scale": 1.0})
    torch.manual_seed(0)
    net = build_generator(cfg, (8, 4, 4), _tokens(tokenizer_file)).eval()
    atomic_save({"model": net.state_dict(), "name": model, **checkpoint_meta(net)},
                tmp_path / "ema.pt")
    loaded = load_generator(tmp_path / "ema.pt", (8, 4, 4), 10)
    assert float(loaded.residual_scale) == 0.5
    y = torch.arange(6) % 10
    a, b = (sample_latents(cfg, m, y, (8, 4, 4), torch.zeros(6, 8, 4, 4),
                           generator=torch.Generator().manual_seed(1)) for m in (net, loaded))
    assert a.shape == (6, 8, 4, 4)
    torch.testing.assert_close(a, b)


def test_head_off_samples_the_discrete_latent_of_the_same_tokens(tokenizer_file):
    base = {"steps": 4, "scale": 1.0}
    on, off = _cfg(sample=base), _cfg(sample={**base, "residual": False})
    torch.manual_seed(0)
    net = build_generator(on, (8, 4, 4), _tokens(tokenizer_file)).eval()
    with torch.no_grad():  # a head that predicts something: its last layer starts at zero
        for p in net.model.residual_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.arange(4)
    hybrid, discrete = (sample_latents(c, net, y, (8, 4, 4), None,
                                       generator=torch.Generator().manual_seed(5))
                        for c in (on, off))
    added = hybrid - discrete  # the same token draws: the difference is the head's residual
    assert added.abs().max() > 1e-4
    assert added.abs().max() <= float(net.residual_scale) + 1e-6  # its clipped [-1, 1], scaled


@pytest.mark.parametrize("model, parts", [("HART-micro", {"tokens", "residual", "accuracy"}),
                                          ("VAR-micro", {"tokens", "accuracy"})])
def test_objective_trains_the_tokens_and_reports_its_parts(tokenizer_file, model, parts):
    cfg = _cfg(generator={"model": model, "label_dropout": 0.0})
    torch.manual_seed(0)
    net = build_generator(cfg, (8, 4, 4), _tokens(tokenizer_file))
    objective = ScalewiseObjective(1.0, (0.5, 1.0))
    f = tokenizer_file[0].encode(torch.rand(16, 3, 32, 32) * 2 - 1).detach()
    y = torch.arange(16) % 10
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        loss = objective.loss(net, f, y, noise=None, t=objective.sample_time(16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else objective.terms["tokens"].item()
    assert set(objective.terms) == parts
    assert objective.terms["tokens"].item() < 0.7 * first
    assert all(p.grad is None for p in net.quantizer.parameters())  # the tokenizer stays frozen


def test_presets_of_the_family():
    imagenet = load_config(None, "imagenet256-hart")
    check_registries(imagenet)
    assert (imagenet.generator.model, imagenet.encoder.name) == ("HART-d20", "var-vq")
    assert (imagenet.data.resolution, imagenet.sample.steps) == (256, 8)
    assert (imagenet.sample.top_k, imagenet.sample.top_p, imagenet.sample.scale) == \
        (900, 0.96, 1.5)
    for name in ("smoke-hart", "tiny-hart"):
        cfg = load_config(None, name)
        check_registries(cfg)
        assert cfg.data.dataset == "digits" and cfg.autoencoder.kind == "hybrid-vq"
        assert cfg.autoencoder.hybrid_prob == 0.5 and cfg.sample.residual
