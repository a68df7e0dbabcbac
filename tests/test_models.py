"""Generators and their registry: shapes, sizes, zero-init, width rule, patches, FLOPs."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rae_core.models import (
    MODELS,
    DiT,
    DiTDDPM,
    DiTDH,
    ModelConfigError,
    build_model,
    check_width,
    count_params,
    get_config,
    model_flops_per_image,
    model_macs,
    reference_latent,
)
from rae_core.models.blocks import LabelEmbedder, RoPE2D, patchify, unpatchify
from rae_core.transport import Transport

SMALL = [n for n in MODELS if "tiny" in n or "micro" in n]
BIG = [n for n in MODELS if n not in SMALL]
CLASSES = {"dit": DiT, "ditdh": DiTDH, "dit_ddpm": DiTDDPM}




def _out_channels(model: torch.nn.Module) -> int:
    return model.in_channels * (2 if getattr(model, "learn_sigma", False) else 1)


def _inputs(b: int, c: int, g: int, num_classes: int):
    return torch.randn(b, c, g, g), torch.rand(b), torch.randint(0, num_classes + 1, (b,))


def test_reference_latents():
    assert reference_latent("DiT-XL") == (768, 16, 1000)
    assert reference_latent("DiT-XL/2") == reference_latent("DiT-S/8") == (4, 32, 1000)
    assert reference_latent("DiTDH-tiny") == (64, 4, 10)
    assert reference_latent("DiTDH-tiny/2") == reference_latent("DiT-micro/2") == (4, 8, 10)


def test_registry_has_paper_and_laptop_models():
    for size in ("S", "B", "L", "XL", "tiny", "micro"):
        assert MODELS[f"DiT-{size}"].family == "dit"
        assert MODELS[f"DiTDH-{size}"].family == "ditdh"
    assert (MODELS["DiT-XL"].hidden, MODELS["DiT-XL"].depth, MODELS["DiT-XL"].heads) == (1152, 28, 16)
    assert (MODELS["DiTDH-S"].hidden, MODELS["DiTDH-S"].head_hidden) == (384, 2048)


@pytest.mark.parametrize("name", SMALL)
def test_small_models_forward_shape(name):
    torch.manual_seed(0)
    c, g, k = reference_latent(name)
    model = build_model(name, in_channels=c, grid_size=g, num_classes=k)
    assert isinstance(model, CLASSES[get_config(name).family])
    out = model(*_inputs(3, c, g, k))
    assert out.shape == (3, _out_channels(model), g, g)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", BIG)
def test_big_models_forward_shape_on_meta(name):
    c, g, k = reference_latent(name)
    with torch.device("meta"):
        model = build_model(name, c, g, k, allow_narrow=True).eval()
        out = model(*_inputs(2, c, g, k))
    assert out.shape == (2, _out_channels(model), g, g)
    assert out.is_meta


@pytest.mark.parametrize(("name", "expected"), [
    ("DiTDH-XL", 839e6), ("DiTDH-S", 196e6), ("DiT-XL", 676e6)])
def test_paper_parameter_counts(name, expected):
    n = count_params(name, in_channels=768, grid_size=16, num_classes=1000)
    assert abs(n - expected) / expected < 0.01, f"{name}: {n / 1e6:.2f}M"


def test_laptop_models_are_small():
    for name in ("DiT-tiny", "DiTDH-tiny"):
        assert 1e6 <= count_params(name, 64, 4, 10) <= 3e6
    for name in ("DiT-micro", "DiTDH-micro"):
        assert count_params(name, 64, 4, 10) < 1e6
    assert 0.5e6 <= count_params("DiT-tiny/2", 4, 8, 10) <= 3e6
    assert 0.5e6 <= count_params("DiTDH-tiny/2", 4, 8, 10) <= 3e6
    assert count_params("DiT-micro/2", 4, 8, 10) < 1e6


@pytest.mark.parametrize("name", ["DiT-tiny", "DiTDH-tiny", "DiTDH-tiny/2", "DiT-tiny/2"])
def test_output_is_exactly_zero_at_init_but_trainable(name):
    torch.manual_seed(0)
    c, g, k = reference_latent(name)
    model = build_model(name, c, g, k)
    x, t, y = _inputs(4, c, g, k)
    assert torch.count_nonzero(model(x, t, y)) == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(4, _out_channels(model), g, g)
    model(x, t, y).sub(target).pow(2).mean().backward()
    opt.step()
    assert torch.count_nonzero(model(x, t, y)) > 0


def test_width_rule_refuses_narrow_models():
    with pytest.raises(ValueError, match=r"hidden width 384 of DiT-S is below the latent's 768 "
                                         r"channels.*RAE width rule"):
        build_model("DiT-S", 768, 16, 1000)
    with pytest.raises(ModelConfigError, match="hidden >= 128"):
        check_width("DiT-micro", 128)
    with pytest.raises(ModelConfigError, match="hidden=8"):
        check_width("DiT-micro", 32, hidden=8)
    check_width("DiT-XL", 768)
    check_width("DiTDH-S", 768)  # the 2048-wide head is what must cover the channels
    narrow = build_model("DiT-micro", 32, 4, 10, allow_narrow=True, hidden=8, heads=2)
    assert narrow.body.x_embed.out_features == 8


def test_unknown_name_and_override_are_explained():
    with pytest.raises(ValueError, match=r"did you mean DiT-XL\?.*DiTDH-micro"):
        build_model("DiT-XLL", 768, 16, 1000)
    with pytest.raises(ValueError, match="unknown model override.*widht"):
        build_model("DiT-micro", 64, 4, 10, widht=32)
    with pytest.raises(ValueError, match="2D RoPE"):
        build_model("DiT-micro", 64, 4, 10, heads=3)


def test_overrides_change_the_model_and_none_is_ignored():
    model = build_model("DiT-micro", 64, 4, 10, depth=1, hidden=None)
    assert len(model.body.blocks) == 1
    assert model.body.x_embed.out_features == 64


def test_label_dropout_only_in_training_mode():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, dim=8, dropout=0.5)
    y = torch.randint(0, 10, (4000,))
    null = emb.table.weight[10]
    emb.train()
    dropped = (emb(y) == null).all(-1).float().mean().item()
    assert 0.45 < dropped < 0.55
    emb.eval()
    assert torch.equal(emb(y), emb.table(y))
    forced = emb(y[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced, emb.table(torch.stack([torch.tensor(10), y[1], torch.tensor(10), y[3]])))
    model = build_model("DiT-micro", 64, 4, 10, label_dropout=0.3).eval()
    assert not model.body.y_embed.training and model.body.y_embed.dropout == 0.3


def test_class_table_scale_follows_the_registered_config():
    # paper models keep DiT's 0.02; the CPU configs start from a unit-scale table
    assert {get_config(n).label_std for n in ("DiT-S", "DiT-XL", "DiTDH-S", "DiTDH-XL")} == {0.02}
    torch.manual_seed(0)
    for name in ("DiT-tiny", "DiTDH-tiny", "DiT-micro", "DiTDH-micro"):
        table = build_model(name, 64, 4, 10).body.y_embed.table.weight
        assert table.std().item() == pytest.approx(1.0, rel=0.1), name
    small = build_model("DiT-micro", 64, 4, 10, label_std=0.02).body.y_embed.table.weight
    assert small.std().item() == pytest.approx(0.02, rel=0.1)


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    rope = RoPE2D(head_dim=8, grid_size=4)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> float:  # token i attends token j (row-major 4x4 grid)
        qs = rope(q.expand(1, 1, 16, 8))[0, 0, i]
        ks = rope(k.expand(1, 1, 16, 8))[0, 0, j]
        return float(qs @ ks)

    # the same 2D offset (+1 row, +2 cols) from two places, and a different offset
    assert math.isclose(score(0, 6), score(5, 11), rel_tol=1e-5, abs_tol=1e-6)
    assert not math.isclose(score(0, 6), score(0, 9), rel_tol=1e-3)
    assert torch.allclose(rope(q.expand(1, 1, 16, 8)).norm(dim=-1), q.norm().expand(1, 1, 16))


@pytest.mark.parametrize("name", ["DiT-micro", "DiTDH-micro", "DiTDH-tiny", "DiTDH-tiny/2",
                                  "DiT-micro/2"])
def test_flops_match_torch_flop_counter(name):
    c, g, k = reference_latent(name)
    with torch.device("meta"):  # on meta, SDPA is counted as its matmuls
        model = build_model(name, c, g, k).eval()
        inputs = _inputs(2, c, g, k)
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    assert counter.get_total_flops() / 2 == pytest.approx(model_flops_per_image(name, c, g),
                                                          rel=1e-9)
    assert model_flops_per_image(name, c, g) == 2 * model_macs(name, c, g)


def test_patchify_is_a_row_major_grid_of_squares_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 12)
    # token 5 = row 1, col 1: the square x[:, :, 2:4, 2:4], its values (row, col, channel)
    assert torch.equal(tokens[:, 5], x[:, :, 2:4, 2:4].permute(0, 2, 3, 1).reshape(2, 12))
    assert torch.equal(unpatchify(tokens, 2, 8), x)
    assert torch.equal(patchify(x, 1), x.flatten(2).transpose(1, 2))  # patch 1: one token a pixel


def test_patched_flow_model_runs_on_a_vae_latent():
    """DiTDH-tiny/2 on a 4x8x8 latent: 16 tokens of 16 values, as DiTDH-tiny on 64x4x4."""
    torch.manual_seed(0)
    model = build_model("DiTDH-tiny/2", 4, 8, 10)
    assert model.patch == 2 and not hasattr(model, "learn_sigma")
    assert model.body.pos_embed.shape == build_model("DiTDH-tiny", 64, 4, 10).body.pos_embed.shape
    assert (model.body.x_embed.in_features, model.x_embed.in_features) == (16, 16)
    assert model.final.linear.out_features == 16
    assert build_model("DiT-micro", 4, 8, 10, patch=2).body.x_embed.in_features == 16
    with pytest.raises(ModelConfigError, match="8x8 latent does not split into 3x3 patches"):
        build_model("DiT-micro", 4, 8, 10, patch=3)
    with pytest.raises(ModelConfigError, match="patch must be positive"):
        build_model("DiT-micro", 4, 8, 10, patch=0)


def test_patch_one_keeps_the_flow_models_state_dicts():
    for name in ("DiT-micro", "DiTDH-micro"):
        base = build_model(name, 64, 4, 10).state_dict()
        patch1 = build_model(name, 64, 4, 10, patch=1).state_dict()
        assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in patch1.items()}
        assert base["body.x_embed.weight"].shape == (64, 64)


def test_width_rule_counts_the_values_of_a_patch():
    check_width("DiTDH-tiny/2", 4)  # 128 wide head, 16 values a token
    with pytest.raises(ModelConfigError, match=r"128 of DiTDH-tiny/2 is below the 256 values of "
                                               r"a 2x2 patch of 64 channels.*hidden >= 256"):
        check_width("DiTDH-tiny/2", 64)


def test_learn_sigma_defaults_to_the_family():
    assert build_model("DiT-micro/2", 4, 8, 10).learn_sigma
    assert build_model("DiT-micro/2", 4, 8, 10)(*_inputs(1, 4, 8, 10)).shape[1] == 8
    fixed = build_model("DiT-micro/2", 4, 8, 10, learn_sigma=False)
    assert fixed(*_inputs(1, 4, 8, 10)).shape[1] == 4
    assert count_params("DiT-micro/2", 4, 8, 10, learn_sigma=False) == \
        count_params("DiT-micro/2", 4, 8, 10) - 4 * 4 * (64 + 1)  # output linear: 2*2*4 fewer
    assert model_macs("DiT-micro/2", 4, 8, learn_sigma=False) == \
        model_macs("DiT-micro/2", 4, 8) - 16 * 64 * 16
    build_model("DiT-micro", 64, 4, 10, learn_sigma=False)
    with pytest.raises(ModelConfigError, match="learn_sigma is for dit_ddpm.*velocity"):
        build_model("DiT-micro", 64, 4, 10, learn_sigma=True)


def test_flops_of_paper_models_are_plausible():
    # DiT-XL/2 on SD-VAE runs 256 tokens at 118.6 GMACs; here 256 tokens of 768 channels
    gflops = model_flops_per_image("DiT-XL", 768, 16) / 1e9
    assert 2 * 118.6 < gflops < 2 * 125
    assert model_flops_per_image("DiTDH-XL", 768, 16) > model_flops_per_image("DiT-XL", 768, 16)


def _overfit_one_sample(hidden: int, channels: int = 32, steps: int = 500) -> tuple[float, float]:
    """Fit one latent with flow matching; loss on a fixed evaluation batch before / after."""
    torch.manual_seed(0)
    x = torch.randn(1, channels, 4, 4)
    model = build_model("DiT-micro", channels, 4, 1, label_dropout=0.0, allow_narrow=True,
                        hidden=hidden, heads=2, depth=2)
    transport = Transport("logit_normal", shift=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(1)

    @torch.no_grad()
    def evaluate() -> float:
        g = torch.Generator().manual_seed(2)
        return transport.loss(model, x.expand(512, -1, -1, -1),
                              torch.zeros(512, dtype=torch.long), generator=g).item()

    before = evaluate()
    y = torch.zeros(32, dtype=torch.long)
    for _ in range(steps):
        loss = transport.loss(model, x.expand(32, -1, -1, -1), y, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return before, evaluate()


def test_width_rule_single_sample_experiment():
    """The paper's experiment in small: as wide as the 32 channels fits one sample; 8 wide
    cannot, because the noise it must predict has 32 dims per token and it carries 8."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        wide_before, wide_after = _overfit_one_sample(hidden=32)
        narrow_before, narrow_after = _overfit_one_sample(hidden=8)
    finally:
        torch.set_num_threads(threads)
    assert wide_after < wide_before / 10
    assert narrow_after > narrow_before / 3
    assert narrow_after > 5 * wide_after
