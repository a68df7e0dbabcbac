"""VAR's multi-scale quantiser, the scale-wise transformer, HART's token sampling, the registry."""

import bisect
import itertools

import pytest
import torch

from rae_core.hart import HART, cfg_ramp, filter_logits, sample_tokens
from rae_core.models.registry import (
    AR_MODELS,
    ModelConfigError,
    build_ar_model,
    count_ar_params,
    reference_tokenizer,
)
from rae_core.models.residual_head import ResidualHead
from rae_core.models.var import VAR, block_causal_mask
from rae_core.quantize import MultiScaleQuantizer, Phi, codebook_usage, num_tokens, phi_index

VOCAB, CHANNELS, SCALES, CLASSES = 512, 32, (1, 2, 3, 4), 10  # a digit-sized quantiser


def _quantizer(seed: int = 0, **kwargs) -> MultiScaleQuantizer:
    torch.manual_seed(seed)
    return MultiScaleQuantizer(VOCAB, CHANNELS, SCALES, **kwargs)


def _latent(b: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, CHANNELS, SCALES[-1], SCALES[-1], generator=g)


def _scrambled_var(name: str = "VAR-micro") -> VAR:
    """A VAR whose blocks are far from the identity, so attention (and the mask) matter."""
    torch.manual_seed(0)
    var = build_ar_model(name, VOCAB, CHANNELS, SCALES, CLASSES)
    with torch.no_grad():
        for p in var.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return var.eval()


# --- the quantiser ---------------------------------------------------------------------------


def test_mask_rows_see_exactly_their_own_and_earlier_scales():
    for scales in [(1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (2, 3)]:
        mask = block_causal_mask(scales)
        ends = list(itertools.accumulate(k * k for k in scales))
        L = ends[-1]
        assert mask.shape == (L, L) and mask.dtype == torch.bool
        expected = torch.zeros(L, L, dtype=torch.bool)
        for i in range(L):
            scale = bisect.bisect_right(ends, i)  # the scale of token i
            expected[i, :ends[scale]] = True
        assert torch.equal(mask, expected)
    assert block_causal_mask((1, 2))[0].tolist() == [True, False, False, False, False]


def test_discrete_sum_plus_residual_is_the_latent():
    q, f = _quantizer(), _latent()
    indices = q.f_to_indices(f)
    assert [i.shape for i in indices] == [(4, k * k) for k in SCALES]
    discrete, residual = q.indices_to_f_hat(indices), q.residual(f)
    assert torch.equal(residual, f - discrete)  # no straight-through in the residual
    # s + (f - s) == f up to the one rounding of the subtraction (floats cannot promise more)
    ulp = torch.finfo(f.dtype).eps * torch.maximum(f.abs(), discrete.abs())
    assert ((discrete + residual) - f).abs().le(ulp).all()
    out = q(f)
    assert all(torch.equal(a, b) for a, b in zip(out.indices, indices, strict=True))
    assert torch.allclose(out.f_hat, discrete, atol=1e-6)
    assert out.f_hat.shape == f.shape


def test_phi_is_the_half_and_half_blend():
    phi = Phi(4)
    b = torch.randn(4)
    with torch.no_grad():
        phi.conv.weight.zero_()
        phi.conv.bias.copy_(b)
    h = torch.randn(2, 4, 5, 5)
    assert torch.allclose(phi(h), 0.5 * h + 0.5 * b[None, :, None, None], atol=1e-7)


def test_phi_is_chosen_by_relative_position_as_var_does():
    # VAR's 10 scales over 4 shared convs (ticks 1/12 ... 11/12; scale 2 ties, goes low)
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(si, 4, 4) for si in range(4)] == [0, 1, 2, 3]
    assert [phi_index(si, 10, 3) for si in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert _quantizer().phi_of_scale == (0, 1, 2, 3)


def test_codebook_loss_is_the_running_sum_against_the_latent():
    """Scales (1, 2) of one channel, codes {0, 3}, phi the identity (ratio 0)."""
    q = MultiScaleQuantizer(vocab=2, channels=1, scales=(1, 2), beta=0.25, phi_ratio=0.0)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0], [3.0]]))
    f = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    out = q(f)
    # scale 1: mean 3 -> code 3, f_hat_1 = 3 everywhere, residual [[-2, -1], [0, 3]];
    # scale 2: codes [[0, 0], [0, 3]], f_hat_2 = [[3, 3], [3, 6]]
    assert [i.tolist() for i in out.indices] == [[[1]], [[0, 0, 0, 1]]]
    mse1 = (4 + 1 + 0 + 9) / 4
    mse2 = (4 + 1 + 0 + 0) / 4
    assert out.loss.item() == pytest.approx((1 + 0.25) * (mse1 + mse2) / 2, rel=1e-6)
    assert torch.allclose(out.f_hat, torch.tensor([[[[3.0, 3.0], [3.0, 6.0]]]]))


def test_straight_through_gradient_and_codebook_gradient():
    q = _quantizer()
    f = _latent().requires_grad_(True)
    q(f).f_hat.sum().backward()
    assert torch.equal(f.grad, torch.ones_like(f))
    assert q.embedding.weight.grad is None  # the straight-through output reaches no code
    f.grad = None
    out = q(f)
    out.loss.backward()
    used = torch.cat([i.flatten() for i in out.indices]).unique()
    grad = q.embedding.weight.grad
    assert grad[used].abs().sum(1).gt(0).all()  # every used code is pulled towards f
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[used] = False
    assert grad[unused].eq(0).all()
    assert all(phi.conv.weight.grad.abs().sum() > 0 for phi in q.phis)
    assert f.grad.abs().sum() > 0  # the commitment term moves the encoder


def test_codebook_usage():
    perplexity, dead = codebook_usage([torch.tensor([[0, 0]]), torch.tensor([[1, 1, 0, 1]])], 4)
    assert perplexity.item() == pytest.approx(2.0) and dead == 2
    perplexity, dead = codebook_usage([torch.arange(8)[None]], 8)
    assert perplexity.item() == pytest.approx(8.0) and dead == 0
    out = _quantizer()(_latent())
    assert 1 <= out.perplexity.item() <= VOCAB and 0 <= out.dead_codes < VOCAB


def test_teacher_inputs_are_the_sampling_steps_inputs():
    q, f = _quantizer(), _latent()
    indices = q.f_to_indices(f)
    teacher = q.teacher_inputs(indices)
    assert teacher.shape == (4, num_tokens(SCALES) - SCALES[0] ** 2, CHANNELS)
    f_hat, steps = torch.zeros_like(f), []
    for si, k in enumerate(SCALES):
        codes = q.embedding(indices[si]).transpose(1, 2).reshape(4, CHANNELS, k, k)
        f_hat, nxt = q.next_input(si, f_hat, codes)
        if si < len(SCALES) - 1:
            assert nxt.shape == (4, CHANNELS, SCALES[si + 1], SCALES[si + 1])
            steps.append(nxt.flatten(2).transpose(1, 2))
        else:
            assert nxt is None
    assert torch.equal(teacher, torch.cat(steps, dim=1))
    assert torch.allclose(f_hat, q.indices_to_f_hat(indices), atol=1e-6)


# --- the transformer and its sampling --------------------------------------------------------


def _teacher_batch(b: int = 4):
    q = _quantizer()
    indices = q.f_to_indices(_latent(b))
    labels = torch.arange(b) % CLASSES
    return q, indices, q.teacher_inputs(indices), labels


def test_kv_cache_steps_equal_the_masked_forward():
    var = _scrambled_var()
    _, _, inputs, labels = _teacher_batch()
    with torch.no_grad():
        logits, hidden = var(labels, inputs)
        assert logits.shape == (4, num_tokens(SCALES), VOCAB)
        assert hidden.shape == (4, num_tokens(SCALES), var.width)
        cache, steps = var.new_cache(), []
        for si in range(len(SCALES)):
            a, b = var.begins[si], var.ends[si]
            scale_inputs = inputs[:, a - 1:b - 1] if si else None
            steps.append(var.step(labels, si, scale_inputs, cache))
        with pytest.raises(ValueError, match="cache holds 30 tokens but scale 1 begins"):
            var.step(labels, 1, inputs[:, :4], cache)
    assert torch.allclose(torch.cat([s[0] for s in steps], 1), logits, atol=1e-5)
    assert torch.allclose(torch.cat([s[1] for s in steps], 1), hidden, atol=1e-5)


def test_a_scale_sees_no_later_scale():
    var = _scrambled_var()
    _, _, inputs, labels = _teacher_batch()
    changed = inputs.clone()
    a, b = var.begins[2], var.ends[2]  # scale 2's tokens; their inputs sit one scale-0 token back
    changed[:, a - 1:b - 1] += 1.0
    with torch.no_grad():
        before, _ = var(labels, inputs)
        after, _ = var(labels, changed)
    assert torch.equal(before[:, :a], after[:, :a])
    assert (before[:, a:] - after[:, a:]).abs().amax(-1).gt(1e-6).all()
    with pytest.raises(ValueError, match="do not end a scale"):
        var(labels, inputs[:, :5])
    assert var(labels, inputs[:, :4])[0].shape == (4, 5, VOCAB)  # a prefix of two scales


def test_label_dropout_only_in_training():
    var = _scrambled_var()
    _, _, inputs, labels = _teacher_batch()
    var.label_dropout = 1.0
    null = torch.full_like(labels, CLASSES)
    with torch.no_grad():
        var.train()
        dropped = var(labels, inputs)[0]
        var.eval()
        assert torch.equal(dropped, var(null, inputs)[0])
        assert not torch.equal(dropped, var(labels, inputs)[0])


def test_cached_sampling_draws_what_the_full_sequence_draws():
    var, q = _scrambled_var(), _quantizer()
    labels = torch.tensor([0, 3, 7])
    samples = [sample_tokens(var, q, labels, cfg_scale=2.0, top_k=100, top_p=0.95,
                             generator=torch.Generator().manual_seed(5), use_cache=use)
               for use in (True, False)]
    cached, full = samples
    for a, b, k in zip(cached.indices, full.indices, SCALES, strict=True):
        assert a.shape == (3, k * k) and torch.equal(a, b)
    assert torch.allclose(cached.f_hat, full.f_hat, atol=1e-5)
    assert torch.allclose(cached.f_hat, q.indices_to_f_hat(cached.indices), atol=1e-5)
    assert cached.hidden.shape == cached.hidden_uncond.shape == (3, SCALES[-1] ** 2, var.width)
    assert torch.allclose(cached.hidden, full.hidden, atol=1e-5)
    assert not var.training
    other = sample_tokens(var, q, labels, 2.0, generator=torch.Generator().manual_seed(6))
    assert any(not torch.equal(a, b) for a, b in zip(other.indices, cached.indices, strict=True))


def test_cfg_ramp_runs_from_zero_to_the_full_scale():
    assert cfg_ramp(0, 10, 1.5) == 0.0
    assert cfg_ramp(9, 10, 1.5) == 1.5
    assert cfg_ramp(3, 10, 1.5) == pytest.approx(0.5)
    assert [cfg_ramp(si, 4, 3.0) for si in range(4)] == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_filter_logits_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 100)
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)
    kept = filter_logits(logits, top_k=9).isfinite()
    assert kept.sum(-1).eq(9).all()
    assert torch.equal(kept, logits >= logits.topk(9, dim=-1).values[..., -1:])
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert filter_logits(probs, top_p=0.75).isfinite().tolist() == [False, True, False, True]
    assert filter_logits(probs, top_p=0.85).isfinite().tolist() == [False, True, True, True]
    assert filter_logits(probs, top_p=0.4).isfinite().tolist() == [False, True, False, False]
    for p in (0.1, 0.5, 0.9, 0.99):  # the smallest most-likely set with mass >= p
        kept = filter_logits(logits, top_p=p).isfinite()
        mass = logits.softmax(-1).sort(-1, descending=True).values.cumsum(-1)
        m = kept.sum(-1, keepdim=True)
        assert mass.gather(-1, m - 1).ge(p - 1e-6).all()
        assert torch.where(m > 1, mass.gather(-1, (m - 2).clamp_min(0)), 0).lt(p).all()


def test_var_micro_learns_a_fixed_batch():
    torch.manual_seed(0)
    q, indices, inputs, labels = _teacher_batch(16)
    targets = torch.cat(indices, dim=1)  # (B, L)
    var = build_ar_model("VAR-micro", VOCAB, CHANNELS, SCALES, CLASSES, label_dropout=0.0)
    opt = torch.optim.AdamW(var.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits, _ = var(labels, inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), rel=0.02)
    assert losses[-1] < 0.6 * losses[0]


# --- the registry -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "target"), [
    ("VAR-d16", 310.3e6), ("VAR-d20", 600.9e6), ("VAR-d24", 1.033e9), ("VAR-d30", 2.010e9)])
def test_var_parameter_counts_match_the_paper(name, target):
    assert reference_tokenizer(name) == (4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 1000)
    n = count_ar_params(name)
    assert abs(n - target) / target < 0.01, f"{name}: {n:,}"


@pytest.mark.parametrize("depth", [20, 24, 30])
def test_hart_is_var_plus_its_residual_head(depth):
    with torch.device("meta"):
        head = ResidualHead(token_channels=32, cond_channels=64 * depth, width=1024, depth=6)
    head_params = sum(p.numel() for p in head.parameters())
    assert 35e6 < head_params < 38e6  # HART's "37M" head
    assert count_ar_params(f"HART-d{depth}") == count_ar_params(f"VAR-d{depth}") + head_params


def test_small_configs_are_sized_on_the_registered_digit_tokenizers():
    from rae_core.hybrid_vq import tokenizer_config

    for size in ("tiny", "micro"):
        tok = tokenizer_config(f"vq-{size}")
        for family in ("VAR", "HART"):
            assert reference_tokenizer(f"{family}-{size}") == (tok.vocab, tok.z_channels,
                                                                tok.scales, 10)


@pytest.mark.parametrize("name", [n for n in AR_MODELS if "tiny" in n or "micro" in n])
def test_small_configs_build_and_run(name):
    torch.manual_seed(0)
    vocab, channels, scales, classes = reference_tokenizer(name)
    model = build_ar_model(name, vocab, channels, scales, classes)
    var = model.var if isinstance(model, HART) else model
    assert isinstance(var, VAR)
    inputs = torch.randn(2, num_tokens(scales) - 1, channels)
    logits, hidden = var(torch.tensor([1, 2]), inputs)
    assert logits.shape == (2, num_tokens(scales), vocab)
    n = count_ar_params(name)
    assert (0.7e6 < n < 1.5e6) if "tiny" in name else (n < 0.2e6)
    if isinstance(model, HART):
        last = hidden[:, -scales[-1] ** 2:].flatten(0, 1)  # (B * 16, D)
        out = model.residual_head(torch.randn(last.shape[0], channels),
                                  torch.randint(0, 1000, (last.shape[0],)), last)
        assert out.shape == (last.shape[0], 2 * channels)


def test_var_defaults_follow_the_depth_rule():
    with torch.device("meta"):
        var = VAR(4096, 32, (1, 2), depth=16)
    assert var.width == 1024 and var.blocks[0].attn.heads == 16
    assert var.blocks[0].mlp.fc1.out_features == 4096
    assert var.class_emb.num_embeddings == 1001 and var.pos_start.shape == (1, 1, 1024)


def test_unknown_ar_model_is_explained():
    with pytest.raises(ModelConfigError, match=r"did you mean VAR-micro\?.*HART-tiny"):
        build_ar_model("VAR-mikro", 16, 4, (1, 2), 10)


def test_model_table_lists_the_autoregressive_models():
    from rae_core.validate import model_table

    table = model_table()
    for name in AR_MODELS:
        assert name in table
    assert "310.3M" in table
