"""The original DiT (Peebles & Xie): sizes and MACs against the paper's table, architecture."""

import math

import pytest
import torch
from torch import nn

from rae_core.models import MODELS, DiTDDPM, build_model, count_params, get_config, model_macs
from rae_core.models.dit_ddpm import SinusoidalTimestepEmbedder

# parameters (4x32x32 latent, patch 2, 1000 classes, learned sigma, the sin-cos table included)
# and GMACs at patch 8 / 4 / 2, as printed in the reference table
TABLE = {
    "S": (32_963_360, ("0.36", "1.41", "6.06")),
    "B": (130_512_416, ("1.42", "5.56", "23.0")),
    "L": (458_102_816, ("5.01", "19.7", "80.7")),
    "XL": (675_129_632, ("7.39", "29.0", "118.6")),
}
PAPER = [f"DiT-{size}/{p}" for size in TABLE for p in (2, 4, 8)]


def _expected_params(hidden: int, depth: int, patch: int, c: int = 4, classes: int = 1000) -> int:
    """DiT's trainable parameters counted layer by layer from the paper's description."""
    d, out = hidden, 2 * c
    linear = lambda i, o: i * o + o  # noqa: E731
    block = linear(d, 3 * d) + linear(d, d) + linear(d, 4 * d) + linear(4 * d, d) \
        + linear(d, 6 * d)
    return (linear(c * patch * patch, d)  # patch conv
            + linear(256, d) + linear(d, d)  # time MLP
            + (classes + 1) * d  # class table with its null row
            + depth * block
            + linear(d, 2 * d) + linear(d, patch * patch * out))  # final adaLN and linear


def test_paper_configs_are_registered_with_the_table_bodies():
    assert all(get_config(n).family == "dit_ddpm" for n in PAPER)
    assert (MODELS["DiT-XL/2"].hidden, MODELS["DiT-XL/2"].depth, MODELS["DiT-XL/2"].heads,
            MODELS["DiT-XL/2"].patch) == (1152, 28, 16, 2)
    assert (MODELS["DiT-S/8"].hidden, MODELS["DiT-S/8"].patch) == (384, 8)
    assert {n: get_config(n).label_std for n in ("DiT-tiny/2", "DiT-micro/2")} == \
        {"DiT-tiny/2": 1.0, "DiT-micro/2": 1.0}
    assert get_config("DiT-XL/2").label_std == 0.02


@pytest.mark.parametrize("name", PAPER)
def test_parameter_counts_match_the_table(name):
    cfg = get_config(name)
    n = count_params(name, 4, 32, 1000)
    pos_table = (32 // cfg.patch) ** 2 * cfg.hidden  # a buffer here, a frozen parameter in DiT
    assert n == _expected_params(cfg.hidden, cfg.depth, cfg.patch)
    if cfg.patch == 2:
        expected = TABLE[name[4:-2]][0]
        assert n + pos_table == expected
        assert abs(n - expected) / expected < 0.005, f"{name}: {n / 1e6:.2f}M"


@pytest.mark.parametrize("name", PAPER)
def test_macs_match_the_table(name):
    cfg = get_config(name)
    printed = TABLE[name[4:-2]][1][(8, 4, 2).index(cfg.patch)]
    expected = float(printed) * 1e9
    # 0.5%, or half a unit of the table's last printed digit (S/8: 0.358 is printed 0.36)
    ulp = 10.0 ** -len(printed.split(".")[1]) * 1e9
    gmacs = model_macs(name, 4, 32)
    assert abs(gmacs - expected) <= max(0.005 * expected, ulp / 2), f"{name}: {gmacs / 1e9:.4f}"


def test_architecture_is_the_papers():
    model = build_model("DiT-micro/2", 4, 8, 10)
    assert isinstance(model, DiTDDPM)
    assert (model.in_channels, model.grid_size, model.num_classes, model.learn_sigma) == \
        (4, 8, 10, True)
    assert isinstance(model.x_embed, nn.Conv2d)
    assert (model.x_embed.kernel_size, model.x_embed.stride) == ((2, 2), (2, 2))
    assert "pos_embed" not in model.state_dict() and model.pos_embed.shape == (16, 64)
    assert model.y_embed.table.num_embeddings == 11  # null row for classifier-free guidance
    block = model.blocks[0]
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(not n.elementwise_affine and n.eps == 1e-6 for n in norms)
    assert block.attn.qkv.bias is not None
    assert isinstance(block.mlp[1], nn.GELU) and block.mlp[1].approximate == "tanh"
    assert block.mlp[0].out_features == 4 * 64
    assert block.ada.linear.out_features == 6 * 64
    assert model.final.ada.linear.out_features == 2 * 64
    assert model.final.linear.out_features == 2 * 2 * 8


def test_zero_init_output_and_label_dropout():
    torch.manual_seed(0)
    model = build_model("DiT-micro/2", 4, 8, 10, label_dropout=1.0)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    assert torch.count_nonzero(model(x, t, torch.tensor([1, 2, 3]))) == 0
    with torch.no_grad():
        nn.init.normal_(model.final.linear.weight)
        nn.init.normal_(model.final.ada.linear.weight)
    y = torch.tensor([1, 2, 3])
    null = torch.full_like(y, 10)
    assert torch.equal(model.train()(x, t, y), model.eval()(x, t, null))  # every label dropped
    dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 0]))
    assert torch.equal(dropped[0], model(x, t, null)[0])
    assert torch.equal(dropped[1:], model(x, t, y)[1:])


def test_timestep_embedding_features():
    emb = SinusoidalTimestepEmbedder(8)
    assert emb.freqs.shape == (128,) and emb.freqs[0] == 1.0
    assert emb.freqs[-1].item() == pytest.approx(math.exp(-math.log(1e4) * 127 / 128))
    # integer and float steps embed alike
    assert torch.equal(emb(torch.tensor([3, 999])), emb(torch.tensor([3.0, 999.0])))
