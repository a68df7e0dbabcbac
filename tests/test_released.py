"""The paper's released checkpoints map onto our models key for key and shape for shape (on the
meta device: the XL sizes cost nothing), the translated weights compute what the reference
layout computes (small models, real numbers), and double_silu is exactly SiLU applied twice."""

import pytest
import torch
import torch.nn.functional as F

from rae_core import released
from rae_core.decoder import DECODERS, ViTDecoder, build_decoder
from rae_core.errors import ConfigError, DataError
from rae_core.models import build_model
from rae_core.models.blocks import swiglu_hidden


def reference_ditdh_shapes(c=768, n=16, classes=1000, hidden=(1152, 2048), depth=(28, 2),
                           heads=(16, 16), p=1) -> dict[str, tuple[int, ...]]:
    """DiTwDDTHead's state dict (stage2/models/DDT.py, use_pos_embed, use_rope, RMSNorm,
    SwiGLU, no qk-norm): names and shapes, as its constructor lays them out."""
    hb, hh = hidden
    shapes = {"x_embedder.proj.weight": (hh, c * p * p, p, p), "x_embedder.proj.bias": (hh,),
              "s_embedder.proj.weight": (hb, c * p * p, p, p), "s_embedder.proj.bias": (hb,),
              "t_embedder.W": (256,), "t_embedder.mlp.0.weight": (hb, 512),
              "t_embedder.mlp.0.bias": (hb,), "t_embedder.mlp.2.weight": (hb, hb),
              "t_embedder.mlp.2.bias": (hb,), "y_embedder.embedding_table.weight": (classes + 1, hb),
              "final_layer.norm_final.weight": (hh,),
              "final_layer.linear.weight": (c * p * p, hh), "final_layer.linear.bias": (c * p * p,),
              "final_layer.adaLN_modulation.1.weight": (2 * hh, hh),
              "final_layer.adaLN_modulation.1.bias": (2 * hh,),
              "pos_embed": (1, (n // p) ** 2, hb),
              "enc_feat_rope.freqs_cos": ((n // p) ** 2, hb // heads[0]),
              "enc_feat_rope.freqs_sin": ((n // p) ** 2, hb // heads[0]),
              "dec_feat_rope.freqs_cos": ((n // p) ** 2, hh // heads[1]),
              "dec_feat_rope.freqs_sin": ((n // p) ** 2, hh // heads[1])}
    if hb != hh:
        shapes |= {"s_projector.weight": (hh, hb), "s_projector.bias": (hh,)}
    for i in range(sum(depth)):
        d = hb if i < depth[0] else hh
        m = int(2 / 3 * int(d * 4.0))
        shapes |= {f"blocks.{i}.{k}": v for k, v in {
            "norm1.weight": (d,), "norm2.weight": (d,),
            "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "mlp.w12.weight": (2 * m, d), "mlp.w12.bias": (2 * m,),
            "mlp.w3.weight": (d, m), "mlp.w3.bias": (d,),
            "adaLN_modulation.1.weight": (6 * d, d), "adaLN_modulation.1.bias": (6 * d,)}.items()}
    return shapes


def reference_decoder_shapes(latent=768, n=16, p=16, width=1152, depth=28, mlp=4096
                             ) -> dict[str, tuple[int, ...]]:
    """GeneralDecoder's state dict (stage1/decoders/decoder.py): names and shapes."""
    shapes = {"decoder_embed.weight": (width, latent), "decoder_embed.bias": (width,),
              "decoder_pos_embed": (1, n * n + 1, width), "trainable_cls_token": (1, 1, width),
              "decoder_norm.weight": (width,), "decoder_norm.bias": (width,),
              "decoder_pred.weight": (p * p * 3, width), "decoder_pred.bias": (p * p * 3,)}
    for i in range(depth):
        layer = {"attention.attention.query": (width, width),
                 "attention.attention.key": (width, width),
                 "attention.attention.value": (width, width),
                 "attention.output.dense": (width, width), "intermediate.dense": (mlp, width),
                 "output.dense": (width, mlp), "layernorm_before": None, "layernorm_after": None}
        for name, w in layer.items():
            out = (w or (width,))[0]
            shapes[f"decoder_layers.{i}.{name}.weight"] = w or (width,)
            shapes[f"decoder_layers.{i}.{name}.bias"] = (out,)
    return shapes


def _meta(shapes):
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_the_released_ditdh_xl_maps_onto_ours_key_for_key():
    with torch.device("meta"):
        model = build_model("DiTDH-XL", 768, 16, 1000, double_silu=True)
    theirs = _meta(reference_ditdh_shapes())
    ours = released.ditdh_state(theirs, body_depth=28)
    assert len(ours) == len(theirs)  # one of ours per one of theirs
    assert released.check(model, ours) == []
    # every persistent key of ours is filled, and the fixed tables too
    assert set(model.state_dict()) <= set(ours)
    assert {"body.pos_embed", "body.rope.cos", "rope.sin"} <= set(ours)
    assert swiglu_hidden(1152) == 3072  # the reference's int(2/3 * 4608)


def test_the_released_vit_xl_decoder_maps_onto_ours_key_for_key():
    s = DECODERS["ViT-XL"]
    with torch.device("meta"):
        dec = ViTDecoder(768, 16, 16, s.width, s.depth, s.heads, s.mlp_dim, ln_eps=1e-12)
    theirs = _meta(reference_decoder_shapes())
    ours = released.decoder_state(theirs, patch_size=16)
    assert len(ours) == len(theirs) - 2 * 2 * 28  # q, k, v (weight, bias) -> one qkv each
    assert released.check(dec, ours) == []
    assert set(dec.state_dict()) <= set(ours)


def test_a_file_of_another_size_is_named_in_one_line(tmp_path):
    with torch.device("meta"):
        model = build_model("DiTDH-XL", 768, 16, 1000, double_silu=True)
    shapes = reference_ditdh_shapes()
    del shapes["blocks.29.mlp.w3.bias"]
    shapes["blocks.0.attn.qkv.weight"] = (3 * 1024, 1152)
    shapes["extra.weight"] = (3,)
    problems = released.check(model, released.ditdh_state(_meta(shapes), 28))
    assert problems == ["missing blocks.1.mlp.w3.bias", "unexpected extra.weight",
                        "body.blocks.0.attn.qkv.weight: file (3072, 1152) vs model (3456, 1152)"]
    with pytest.raises(DataError, match=r"generator.weights: f.pt does not fit .*missing blocks"):
        released.load(model, released.ditdh_state(_meta(shapes), 28), "f.pt",
                      "generator.weights")
    with pytest.raises(ConfigError, match=r"decoder.weights: .*nope.pt not found"):
        released.read(tmp_path / "nope.pt", "decoder.weights")


# --- real numbers: the reference layout's computation, written out from its public code ---

def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, cos, sin):
    x2 = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-x2[..., 1], x2[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _reference_block(sd, pre, x, c, cos, sin, heads):
    mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"],
                   sd[pre + "adaLN_modulation.1.bias"])
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
    h = _rms(x, sd[pre + "norm1.weight"]) * (1 + sc1) + sh1
    b, n, d = h.shape
    qkv = F.linear(h, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(_rope(q, cos, sin), _rope(k, cos, sin), v)
    a = F.linear(a.transpose(1, 2).reshape(b, n, d), sd[pre + "attn.proj.weight"],
                 sd[pre + "attn.proj.bias"])
    x = x + g1 * a
    h = _rms(x, sd[pre + "norm2.weight"]) * (1 + sc2) + sh2
    gate, val = F.linear(h, sd[pre + "mlp.w12.weight"], sd[pre + "mlp.w12.bias"]).chunk(2, -1)
    return x + g2 * F.linear(F.silu(gate) * val, sd[pre + "mlp.w3.weight"], sd[pre + "mlp.w3.bias"])


def _reference_ditdh(sd, x, t, y, depth, heads):
    """DiTwDDTHead.forward (patch 1) on a state dict in its own layout."""
    ang = t[:, None] * sd["t_embedder.W"][None] * 2 * torch.pi
    te = torch.cat([ang.sin(), ang.cos()], -1)
    te = F.linear(F.silu(F.linear(te, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                  sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(te + sd["y_embedder.embedding_table.weight"][y])[:, None]
    tokens = x.flatten(2).transpose(1, 2)
    s = F.conv2d(x, sd["s_embedder.proj.weight"], sd["s_embedder.proj.bias"])
    s = s.flatten(2).transpose(1, 2) + sd["pos_embed"]
    for i in range(depth[0]):
        s = _reference_block(sd, f"blocks.{i}.", s, c, sd["enc_feat_rope.freqs_cos"],
                             sd["enc_feat_rope.freqs_sin"], heads[0])
    s = F.linear(F.silu(te[:, None] + s), sd["s_projector.weight"], sd["s_projector.bias"])
    h = F.linear(tokens, sd["x_embedder.proj.weight"].flatten(1), sd["x_embedder.proj.bias"])
    for i in range(depth[0], sum(depth)):
        h = _reference_block(sd, f"blocks.{i}.", h, s, sd["dec_feat_rope.freqs_cos"],
                             sd["dec_feat_rope.freqs_sin"], heads[1])
    shift, scale = F.linear(F.silu(s), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, -1)
    out = F.linear(_rms(h, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift,
                   sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    return out.transpose(1, 2).reshape(x.shape)


def _random(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) * 0.2 for k, v in shapes.items()}


def test_a_translated_ditdh_computes_what_the_reference_layout_computes(tmp_path):
    c, n, hidden, depth, heads = 8, 4, (32, 48), (2, 1), (2, 3)
    theirs = _random(reference_ditdh_shapes(c, n, 5, hidden, depth, heads), 0)
    path = tmp_path / "ditdh.pt"
    torch.save({"ema": theirs}, path)
    model = build_model("DiTDH-micro", c, n, 5, hidden=32, depth=2, heads=2, head_hidden=48,
                        head_depth=1, head_heads=3, double_silu=True, allow_narrow=True).eval()
    released.load_generator(model, path)
    torch.manual_seed(0)
    x, t, y = torch.randn(3, c, n, n), torch.rand(3), torch.tensor([0, 4, 5])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), _reference_ditdh(theirs, x, t, y, depth, heads),
                              atol=1e-3, rtol=1e-4)  # float32 rounding on outputs ~50
        model.body.double_silu = False  # without the option it computes something else
        assert not torch.allclose(model(x, t, y), _reference_ditdh(theirs, x, t, y, depth, heads),
                                  atol=1e-3)


def test_a_released_ditdh_needs_the_double_silu_option(tmp_path):
    model = build_model("DiTDH-micro", 8, 4, 5, allow_narrow=True)
    with pytest.raises(ConfigError, match="generator.weights: .*double_silu"):
        released.load_generator(model, tmp_path / "x.pt")


def _reference_decoder(sd, z, p, heads, eps=1e-12):
    """GeneralDecoder.forward + unpatchify on a state dict in its own layout."""
    b, c, h, w = z.shape
    x = F.linear(z.flatten(2).transpose(1, 2), sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    x = torch.cat([sd["trainable_cls_token"].expand(b, -1, -1), x], 1) + sd["decoder_pos_embed"]
    d = x.shape[-1]
    i = 0
    while f"decoder_layers.{i}.layernorm_before.weight" in sd:
        pre = f"decoder_layers.{i}."

        def lin(name, v, pre=pre):
            return F.linear(v, sd[pre + name + ".weight"], sd[pre + name + ".bias"])

        hs = F.layer_norm(x, (d,), sd[pre + "layernorm_before.weight"],
                          sd[pre + "layernorm_before.bias"], eps)
        q, k, v = (lin(f"attention.attention.{m}", hs).view(b, -1, heads, d // heads)
                   .transpose(1, 2) for m in ("query", "key", "value"))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        x = x + lin("attention.output.dense", a)
        hs = F.layer_norm(x, (d,), sd[pre + "layernorm_after.weight"],
                          sd[pre + "layernorm_after.bias"], eps)
        x = x + lin("output.dense", F.gelu(lin("intermediate.dense", hs)))
        i += 1
    x = F.layer_norm(x, (d,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps)
    x = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    x = x.reshape(b, h, w, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, h * p, w * p)


def test_a_translated_decoder_computes_what_the_reference_layout_computes(tmp_path):
    c, n, p, width, depth, mlp = 6, 3, 4, 16, 2, 32
    theirs = _random(reference_decoder_shapes(c, n, p, width, depth, mlp), 1)
    torch.save(theirs, tmp_path / "decoder.pt")
    dec = ViTDecoder(c, n, p, width, depth, 2, mlp, ln_eps=1e-12).eval()
    released.load_decoder(dec, tmp_path / "decoder.pt")
    z = torch.randn(2, c, n, n, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(dec(z), _reference_decoder(theirs, z, p, 2), atol=1e-4)


def test_double_silu_is_silu_applied_twice_to_the_condition():
    """Same weights: the option's output equals the plain model's given SiLU(c) in place of c,
    i.e. SiLU(SiLU(c)) inside every adaLN."""
    torch.manual_seed(0)
    plain = build_model("DiTDH-micro", 8, 4, 5, allow_narrow=True).eval()
    for p in plain.parameters():  # zero-initialised adaLN layers would hide the condition
        torch.nn.init.normal_(p, std=0.2)
    double = build_model("DiTDH-micro", 8, 4, 5, allow_narrow=True, double_silu=True).eval()
    double.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 3])
    seen = {}
    for name, model in (("plain", plain), ("double", double)):
        hook = model.body.blocks[0].ada.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0]))
        with torch.no_grad():
            model(x, t, y)
        hook.remove()
    assert torch.equal(seen["double"], F.silu(seen["plain"]))
    with torch.no_grad():
        assert not torch.allclose(plain(x, t, y), double(x, t, y), atol=1e-4)
        # DiT too, through the same body
        dit = build_model("DiT-micro", 8, 4, 5, allow_narrow=True, double_silu=True)
    assert dit.body.double_silu and not build_model("DiT-micro", 8, 4, 5).body.double_silu


def test_build_decoder_default_keeps_our_layer_norm_eps():
    dec = build_decoder("ViT-micro", 8, 2, 4, (0.5,) * 3, (0.5,) * 3)
    assert dec.norm.eps == 1e-6 and dec.blocks[0].norm1.eps == 1e-6


def test_the_sample_stage_builds_a_released_generator_from_generator_weights(tmp_path):
    from rae_core.config import from_dict
    from rae_core.paths import Paths

    cfg = from_dict({"generator": {"model": "DiTDH-micro", "weights": str(tmp_path / "g.pt")}})
    paths, k = Paths.at(tmp_path), cfg.data.num_classes
    assert released.generator_file(cfg, paths) == tmp_path / "g.pt"
    with pytest.raises(ConfigError, match=r"generator.weights: .*g.pt not found"):
        released.configured_generator(cfg, paths, (8, 4, 4))
    theirs = _random(reference_ditdh_shapes(8, 4, k, (64, 128), (2, 2), (2, 2)), 2)
    torch.save(theirs, tmp_path / "g.pt")
    model = released.configured_generator(cfg, paths, (8, 4, 4))
    assert not model.training and model.body.double_silu
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([0, k])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), _reference_ditdh(theirs, x, t, y, (2, 2), (2, 2)),
                              atol=1e-3, rtol=1e-4)  # float32 rounding on outputs ~50
