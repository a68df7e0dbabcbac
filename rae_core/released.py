"""The paper's released checkpoints in this platform's models.

The reference code publishes RAE decoders (HF ViT-MAE's GeneralDecoder layout) and DiT-DH
generators (its DiTwDDTHead layout). `decoder_state` and `ditdh_state` translate such a state
dict into the keys and layouts of rae_core.decoder.ViTDecoder and rae_core.models.DiTDH;
`load` checks every key and shape before it copies anything, so a file of another size fails in
one line instead of loading half a model. Built for the released architectures, the models need
two options: `ln_eps=1e-12` for the decoder (HF ViT-MAE's LayerNorm) and `double_silu=True` for
DiT-DH (its condition passes SiLU twice before an adaLN linear).

The released files also carry their fixed tables (sin-cos position embeddings, RoPE tables,
Fourier frequencies). They are copied into the model's buffers from the file: the reference's
sin-cos tables put the column's half first (MAE's meshgrid order), ours the row's, and copying
makes the loaded model compute exactly what the released one does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from rae_core.errors import ConfigError, DataError

WRAPPERS = ("ema", "model", "state_dict")  # keys a training checkpoint nests its weights under
RELEASED_LN_EPS = 1e-12  # HF ViT-MAE's LayerNorm eps, which the released decoders were trained with


def _conv_as_linear(w: Tensor) -> Tensor:
    """PatchEmbed's Conv2d weight (D, C, p, p) -> our Linear's (D, p*p*C), channels last as
    rae_core.models.blocks.patchify orders a token's values."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _dit_block(theirs: str) -> str:
    """A LightningDDTBlock's key below the block -> ours (rae_core.models.blocks.Block)."""
    return theirs.replace("adaLN_modulation.1.", "ada.linear.")


def ditdh_state(theirs: Mapping[str, Tensor], body_depth: int) -> dict[str, Tensor]:
    """DiTwDDTHead's state dict -> DiTDH's (persistent keys and the fixed tables to copy).

    Their blocks are one list, the body's first `body_depth`, then the head's."""
    fixed = {"s_embedder.proj.bias": "body.x_embed.bias", "pos_embed": "body.pos_embed",
             "t_embedder.W": "body.t_embed.freqs",
             "y_embedder.embedding_table.weight": "body.y_embed.table.weight",
             "enc_feat_rope.freqs_cos": "body.rope.cos", "enc_feat_rope.freqs_sin": "body.rope.sin",
             "dec_feat_rope.freqs_cos": "rope.cos", "dec_feat_rope.freqs_sin": "rope.sin",
             "s_projector.weight": "s_proj.weight", "s_projector.bias": "s_proj.bias",
             "x_embedder.proj.bias": "x_embed.bias",
             "final_layer.norm_final.weight": "final.norm.weight",
             "final_layer.linear.weight": "final.linear.weight",
             "final_layer.linear.bias": "final.linear.bias",
             "final_layer.adaLN_modulation.1.weight": "final.ada.linear.weight",
             "final_layer.adaLN_modulation.1.bias": "final.ada.linear.bias"}
    ours: dict[str, Tensor] = {}
    for key, value in theirs.items():
        if key in fixed:
            ours[fixed[key]] = value[0] if key == "pos_embed" else value  # (1, N, D) -> (N, D)
        elif key in ("s_embedder.proj.weight", "x_embedder.proj.weight"):
            ours[("body." if key[0] == "s" else "") + "x_embed.weight"] = _conv_as_linear(value)
        elif key.startswith("t_embedder.mlp."):
            ours["body.t_embed." + key.removeprefix("t_embedder.")] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            i, rest = int(m[1]), _dit_block(m[2])
            ours[f"body.blocks.{i}.{rest}" if i < body_depth else
                 f"blocks.{i - body_depth}.{rest}"] = value
        else:
            ours[key] = value  # not theirs: reported by `check` as a key our model lacks
    return ours


def decoder_state(theirs: Mapping[str, Tensor], patch_size: int) -> dict[str, Tensor]:
    """GeneralDecoder's state dict -> ViTDecoder's (persistent keys and the position table)."""
    fixed = {"decoder_embed.weight": "embed.weight", "decoder_embed.bias": "embed.bias",
             "decoder_pos_embed": "pos_embed", "trainable_cls_token": "cls_token",
             "decoder_norm.weight": "norm.weight", "decoder_norm.bias": "norm.bias"}
    layer = {"layernorm_before": "norm1", "layernorm_after": "norm2",
             "attention.output.dense": "proj", "intermediate.dense": "mlp.0",
             "output.dense": "mlp.2"}
    ours: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in theirs.items():
        if key in fixed:
            ours[fixed[key]] = value
        elif key.startswith("decoder_pred."):
            # their patch values are (p, p, 3) channels last; pixel_shuffle reads (3, p, p)
            v = value.reshape(patch_size, patch_size, 3, *value.shape[1:]).movedim(2, 0)
            ours["head." + key.removeprefix("decoder_pred.")] = v.reshape(value.shape)
        elif m := re.fullmatch(r"decoder_layers\.(\d+)\.attention\.attention\."
                               r"(query|key|value)\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"decoder_layers\.(\d+)\.(.+)\.(weight|bias)", key):
            name = layer.get(m[2])
            ours[f"blocks.{m[1]}.{name}.{m[3]}" if name else key] = value
        else:
            ours[key] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise DataError(f"released decoder: layer {i} lacks attention {', '.join(missing)}")
        ours[f"blocks.{i}.qkv.{kind}"] = torch.cat([parts[n] for n in ("query", "key", "value")])
    return ours


def _targets(model: nn.Module, ours: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What a translated state fills: every persistent key of the model, and those of its
    non-persistent buffers (fixed tables) the state names."""
    targets = dict(model.state_dict(keep_vars=True))
    buffers = dict(model.named_buffers())
    targets |= {k: buffers[k] for k in ours if k in buffers}
    return targets


def check(model: nn.Module, ours: Mapping[str, Tensor]) -> list[str]:
    """Every disagreement between a translated state and the model: keys the file lacks, keys
    the model lacks, shapes that differ (empty when it loads exactly)."""
    targets = _targets(model, ours)
    problems = [f"missing {k}" for k in targets if k not in ours]
    problems += [f"unexpected {k}" for k in ours if k not in targets]
    problems += [f"{k}: file {tuple(v.shape)} vs model {tuple(targets[k].shape)}"
                 for k, v in ours.items() if k in targets and v.shape != targets[k].shape]
    return problems


def read(path: str | Path, key: str) -> dict[str, Tensor]:
    """The state dict in a released file (plain, or under one of WRAPPERS; DDP's `module.`
    prefix dropped); `key` is the config key that named it, for the one-line errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found (a local copy of the released checkpoint)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{key}: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load(model: nn.Module, ours: Mapping[str, Tensor], path: str | Path, key: str) -> nn.Module:
    """Copy a translated state into `model` after checking that it matches exactly."""
    problems = check(model, ours)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{key}: {path} does not fit the configured model: "
                        f"{'; '.join(problems[:3])}{more}")
    targets = _targets(model, ours)
    with torch.no_grad():
        for k, v in ours.items():
            targets[k].copy_(v)
    return model


def load_generator(model: nn.Module, path: str | Path, key: str = "generator.weights"
                   ) -> nn.Module:
    """A released DiT-DH file into a DiTDH built with double_silu=True and patch 1."""
    if not getattr(model.body, "double_silu", False) or model.patch != 1:
        raise ConfigError(f"{key}: a released DiT-DH needs a DiTDH model with patch 1 and "
                          f"double_silu (its conditioning)")
    return load(model, ditdh_state(read(path, key), len(model.body.blocks)), path, key)


def load_decoder(decoder: nn.Module, path: str | Path, key: str = "decoder.weights"
                 ) -> nn.Module:
    """A released RAE decoder file into a ViTDecoder, its LayerNorms set to the released eps."""
    for m in decoder.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = RELEASED_LN_EPS
    return load(decoder, decoder_state(read(path, key), decoder.patch_size), path, key)


def generator_file(cfg, paths) -> Path:
    """The file `sample` draws with: generator.weights when set, else the trained EMA."""
    w = cfg.generator.weights
    return Path(w).expanduser() if w else paths.generator_dir / "ema.pt"


def configured_generator(cfg, paths, latent_shape) -> nn.Module:
    """The eval-mode generator of this configuration: trained (ema.pt), or the released file
    generator.weights in the registered generator.model with the reference's conditioning."""
    from rae_core.generator import load_generator as load_trained
    from rae_core.models import build_model

    if not cfg.generator.weights:
        return load_trained(generator_file(cfg, paths), latent_shape, cfg.data.num_classes)
    if cfg.generator.kind != "flow":
        raise ConfigError(f"generator.weights: released checkpoints are flow DiT-DH models; "
                          f"generator.kind is {cfg.generator.kind!r}")
    c, h, _ = latent_shape
    model = build_model(cfg.generator.model, c, h, cfg.data.num_classes, double_silu=True)
    return load_generator(model, cfg.generator.weights).eval()
