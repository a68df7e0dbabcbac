"""HART's hybrid tokenizer: VAR's multi-scale VQ autoencoder, whose latent also keeps the
continuous residual that the discrete tokens miss.

The autoencoder is VAR's VQVAE (LDM's vq-f16 layout). Encoder: 3x3 conv_in to `ch`; per
level of ch_mult, num_res_blocks ResNet blocks (GroupNorm + SiLU + 3x3 conv, twice, a 1x1
shortcut where the width changes), each followed by self-attention at the lowest resolution,
then a stride-2 3x3 conv (none after the last level); a mid block (ResNet, attention, ResNet);
GroupNorm, SiLU and a 3x3 conv to z_channels. A 3x3 quant conv gives the latent f
(B, C, R/f, R/f), f = 2^(levels-1); the multi-scale residual quantiser (rae_core.quantize)
gives the discrete latent f_hat, a sum over scales (1, 2, ..., R/f). The decoder mirrors the
encoder behind a 3x3 post-quant conv, with num_res_blocks + 1 blocks per level and a
nearest x2 upsample + 3x3 conv between levels. Pixels are in [-1, 1]; decoded ones are not
clamped, so training sees the true error.

HART's addition is the residual f - f_hat. Its second training phase freezes the encoder, the
quant conv and the quantiser, and trains the post-quant conv and the decoder on f_hat or on
f_hat + residual (= f) at random, so one decoder serves both the discrete tokens alone and the
tokens plus the residual diffusion head's output (`forward`, `freeze_for_decoder_training`).
Module names follow VAR's basic_vae.py (down.i.block.j, mid.attn_1, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rae_core.encoders import Encoder as FrozenEncoder
from rae_core.encoders import file_fingerprint
from rae_core.errors import ConfigError, DataError, WeightsMissingError
from rae_core.quantize import MultiScaleQuantizer, QuantOutput
from rae_core.train.sampler import per_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerConfig:
    ch: int  # width of the first level
    ch_mult: tuple[int, ...]  # level widths as multiples of ch; one x2 down between levels
    num_res_blocks: int
    z_channels: int  # latent channels C
    vocab: int
    scales: tuple[int, ...]  # token map sides, the last = the latent's side
    resolution: int  # the image side the scales are for
    beta: float = 0.25  # commitment weight
    groups: int = 32  # GroupNorm groups (VAR: 32)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


TOKENIZERS: dict[str, TokenizerConfig] = {
    # VAR's and HART's 256 px tokenizer (vae_ch160v4096z32): x16 down, 680 tokens in 10 scales
    "var-vq": TokenizerConfig(160, (1, 1, 2, 2, 4), 2, 32, 4096,
                              (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 256),
    # 32 px digits: x8 down to 4x4, 30 tokens in 4 scales. 16 channels, half VAR's 32, for a
    # far simpler image set. 64 codes: a 512-code book kept ~370 codes dead (perplexity 72),
    # 64 codes are all used (perplexity 52) and leave more to the residual (+1.3 dB hybrid
    # over discrete after phase 2, against +0.9). Width 16 at full resolution, doubling per
    # level (16, 32, 64, 64): 1.05M parameters, 0.3 s per step of 64 images on 2 CPU threads
    # (width 32 throughout the first levels: 2x the time)
    "vq-tiny": TokenizerConfig(16, (1, 2, 4, 4), 1, 16, 64, (1, 2, 3, 4), 32, groups=8),
    # seconds-long tests, same latent side
    "vq-micro": TokenizerConfig(8, (1, 2, 2, 2), 1, 8, 64, (1, 2, 3, 4), 32, groups=4),
}


def tokenizer_config(name: str, **overrides) -> TokenizerConfig:
    """The registered tokenizer config `name` with `overrides` (vocab, z_channels, scales,
    resolution) where not None; an unknown name suggests the closest one."""
    if name not in TOKENIZERS:
        close = difflib.get_close_matches(name, TOKENIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"tokenizer {name!r} is not registered{hint}; valid: "
                          f"{', '.join(TOKENIZERS)}")
    given = {k: tuple(v) if k == "scales" else v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(TOKENIZERS[name], **given)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, as a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom: exactly half the side


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: ResNet blocks (in, out), each followed by attention at the lowest
    resolution (VAR's using_sa). The encoder gives it a `downsample`, the decoder an
    `upsample`, run after the blocks (none at the last level)."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, groups) for _, o in widths if attention)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, w in enumerate(widths):
            level = Level([(cin, w)] + [(w, w)] * (cfg.num_res_blocks - 1), i == last,
                          cfg.groups)
            if i != last:
                level.downsample = Downsample(w)
            self.down.append(level)
            cin = w
        self.mid = Mid(cin, cfg.groups)
        self.norm_out = _norm(cin, cfg.groups)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, R, R)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # side / 2
        h = self.mid(h)  # (B, ch * ch_mult[-1], R/f, R/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, R/f, R/f)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = Mid(cin, cfg.groups)
        levels = []
        for i in reversed(range(len(widths))):  # lowest resolution first
            w = widths[i]
            level = Level([(cin, w)] + [(w, w)] * cfg.num_res_blocks, i == last, cfg.groups)
            if i != 0:
                level.upsample = Upsample(w)
            levels.insert(0, level)  # up[i] is level i, as in the encoder
            cin = w
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, cfg.groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], R/f, R/f)
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # side x 2
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, R, R)


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, 3, R, R) in [-1, 1]-space, not clamped
    vq_loss: torch.Tensor  # the quantiser's codebook + commitment loss (phase 1)
    hybrid: torch.Tensor  # (B,) bool: which samples were decoded from f_hat + residual
    perplexity: torch.Tensor  # of this batch's codes
    dead_codes: int


class HybridTokenizer(nn.Module):
    """encode -> f, quantize -> the discrete latent and its codes, hybrid -> (f_discrete,
    residual), decode -> images; forward is one training step's reconstruction."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        f, c = config.downsampling, config.z_channels
        if config.resolution % f or config.scales[-1] != config.resolution // f:
            raise ConfigError(f"tokenizer scales {config.scales} at {config.resolution} px: "
                              f"the last scale must be the latent side {config.resolution / f:g}")
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(c, c, 3, padding=1)
        self.quantizer = MultiScaleQuantizer(config.vocab, c, config.scales, config.beta)
        self.post_quant_conv = nn.Conv2d(c, c, 3, padding=1)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> the continuous latent f (B, C, R/f, R/f)."""
        return self.quant_conv(self.encoder(x))

    def quantize(self, f: torch.Tensor) -> QuantOutput:
        return self.quantizer(f)

    def hybrid(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_discrete, residual): the sum of all discrete scales, and f - f_discrete, the
        residual diffusion head's target. f_discrete + residual = f."""
        residual = self.quantizer.residual(f)
        return f - residual, residual

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """A latent (B, C, R/f, R/f), discrete or hybrid -> images (B, 3, R, R)."""
        return self.decoder(self.post_quant_conv(f_hat))

    def forward(self, x: torch.Tensor, hybrid_prob: float = 0.0,
                generator: torch.Generator | None = None) -> TokenizerOutput:
        """Reconstruct x from the discrete latent f_hat or, for a random hybrid_prob of the
        samples, from f_hat + residual. hybrid_prob = 0 is VAR's training (phase 1); HART's
        phase 2 decodes both, about half each, after `freeze_for_decoder_training`. The choice
        is per sample (HART's code draws one per batch), so every batch trains both."""
        f = self.encode(x)
        q = self.quantizer(f)
        def draw(m: int, g: torch.Generator | None) -> torch.Tensor:
            return torch.rand(m, generator=g, device=g.device if g is not None else x.device)

        hybrid = (per_sample(generator, x.shape[0], draw)
                  < hybrid_prob).to(x.device)  # rand < 0 never, rand < 1 always
        residual = (f - q.f_hat).detach()  # what the tokens miss; f_hat carries the gradient
        latent = q.f_hat + hybrid.view(-1, 1, 1, 1) * residual  # hybrid rows: f itself
        return TokenizerOutput(self.decode(latent), q.loss, hybrid, q.perplexity, q.dead_codes)

    def freeze_for_decoder_training(self) -> HybridTokenizer:
        """HART's phase 2: the encoder, quant conv and quantiser (codebook and phi convs, as
        HART freezes its whole quantiser) stop training, so f, its tokens and f_hat no longer
        move; the post-quant conv and the decoder, which read the latent, keep training."""
        for part in (self.encoder, self.quant_conv, self.quantizer):
            part.requires_grad_(False)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("tokenizer frozen for decoder training: %d parameters still train", trainable)
        return self


def build_tokenizer(name: str) -> HybridTokenizer:
    """A randomly initialised tokenizer of a registered config (under the current device)."""
    return HybridTokenizer(tokenizer_config(name))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tokenizer_param_counts(name: str) -> tuple[int, int, int, int]:
    """(encoder, quantiser, decoder, total) parameters on the meta device. The encoder includes
    the quant conv, the decoder the post-quant conv, so the three parts sum to the total."""
    with torch.device("meta"):
        tok = build_tokenizer(name)
    enc = _count(tok.encoder) + _count(tok.quant_conv)
    dec = _count(tok.decoder) + _count(tok.post_quant_conv)
    return enc, _count(tok.quantizer), dec, _count(tok)


def tokenizer_macs(name: str) -> tuple[int, int]:
    """(encoder, decoder) multiply-accumulates per image of a registered tokenizer."""
    return config_macs(tokenizer_config(name))


def config_macs(cfg: TokenizerConfig) -> tuple[int, int]:
    """(encoder, decoder) multiply-accumulates per image at the config's resolution, counted by
    torch's FlopCounterMode on the meta device (FLOPs / 2): convolutions and attention; the
    quantiser's nearest-code search, norms, activations and resampling are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    side = cfg.resolution // cfg.downsampling
    with torch.device("meta"):
        tok = HybridTokenizer(cfg)
        with FlopCounterMode(display=False) as enc:
            tok.encode(torch.empty(1, 3, cfg.resolution, cfg.resolution))
        with FlopCounterMode(display=False) as dec:
            tok.decode(torch.empty(1, cfg.z_channels, side, side))
    return enc.get_total_flops() // 2, dec.get_total_flops() // 2


class TokenizerEncoder(FrozenEncoder):
    """The encoder half as the stages use it: [0, 1] images -> the continuous latent f
    (B, C, R/f, R/f), unnormalised; its `quantizer` gives the tokens and the residual."""

    def __init__(self, name: str, tokenizer: HybridTokenizer, weights_label: str = "random",
                 weights_sha256: str | None = None) -> None:
        cfg = tokenizer.config
        side = cfg.resolution // cfg.downsampling
        # the tokenizer sees [-1, 1]: mean and std 0.5
        super().__init__(name, cfg.resolution, cfg.resolution, (cfg.z_channels, side, side),
                         (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.config = cfg
        self.encoder, self.quant_conv, self.quantizer = (tokenizer.encoder, tokenizer.quant_conv,
                                                         tokenizer.quantizer)
        self.weights_label, self.weights_sha256 = weights_label, weights_sha256

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(self.prepare(images)))

    def identity(self) -> dict:
        return {**super().identity(), "vocab": self.config.vocab,
                "scales": list(self.config.scales)}


class TokenizerDecoder(nn.Module):
    """The decoder half: a latent (B, C, h, w) -> images (B, 3, R, R) in [0, 1]-space, not
    clamped. In eval mode it decodes the latent it is given (discrete, or hybrid = f). In
    training mode (HART's phase 2) it is given f and decodes, per sample, f itself with
    probability hybrid_prob and the discrete f_hat otherwise, through its frozen copy of the
    quantiser; the post-quant conv and the decoder train."""

    def __init__(self, tokenizer: HybridTokenizer, hybrid_prob: float = 0.5) -> None:
        super().__init__()
        cfg = tokenizer.config
        side = cfg.resolution // cfg.downsampling
        self.latent_shape = (cfg.z_channels, side, side)
        self.hybrid_prob = hybrid_prob
        self.quantizer = tokenizer.quantizer.requires_grad_(False)
        self.post_quant_conv, self.decoder = tokenizer.post_quant_conv, tokenizer.decoder

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The output conv's weight: where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def discrete(self, f: torch.Tensor) -> torch.Tensor:
        """f -> the sum of its discrete scales (what the tokens alone give)."""
        return f - self.quantizer.residual(f)

    def forward(self, z: torch.Tensor, generator=None) -> torch.Tensor:
        if z.shape[1:] != self.latent_shape:
            raise ValueError(f"decoder expects latents of shape {self.latent_shape}, "
                             f"got {tuple(z.shape[1:])}")
        if self.training:
            draw = per_sample(generator, z.shape[0], lambda m, g: torch.rand(m, generator=g)) \
                if generator is not None else torch.rand(z.shape[0], device=z.device)
            hybrid = draw.to(z.device) < self.hybrid_prob  # (B,)
            z = torch.where(hybrid.view(-1, 1, 1, 1), z, self.discrete(z))
        return self.decoder(self.post_quant_conv(z)) * 0.5 + 0.5


def save_tokenizer(tokenizer: HybridTokenizer, name: str, path: Path) -> None:
    from rae_core.store import atomic_save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": tokenizer.state_dict(), "name": name,
                 "config": dataclasses.asdict(tokenizer.config)}, path)


def load_tokenizer(name: str, config: TokenizerConfig, weights: str | Path,
                   setting: str = "encoder.weights") -> HybridTokenizer:
    """A tokenizer of `config` from a local file: a checkpoint pretrain-encoder wrote
    ({'model', 'name', 'config'}) or a bare state dict in this module's layout."""
    from rae_core.store import safe_load

    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsMissingError(f"{setting}: {path} not found; run `rae stage pretrain-encoder`"
                                  " or give a local tokenizer checkpoint")
    state = safe_load(path)
    tok = HybridTokenizer(config)
    try:
        tok.load_state_dict(state.get("model", state))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(f"{setting}: {path} does not hold {name} tokenizer weights of vocab "
                        f"{config.vocab}, {config.z_channels} channels ({first})") from None
    log.info("loaded tokenizer %s from %s", name, path)
    return tok.eval()


def tokenizer_parts(name: str, config: TokenizerConfig, weights: str | Path,
                    hybrid_prob: float = 0.5) -> tuple[TokenizerEncoder, TokenizerDecoder]:
    """(encoder, decoder) of one loaded tokenizer: the encoder frozen, the decoder trainable
    (both in eval mode); the encoder's identity carries the weights' fingerprint."""
    tok = load_tokenizer(name, config, weights)
    encoder = TokenizerEncoder(name, tok, Path(weights).name, file_fingerprint(weights))
    decoder = TokenizerDecoder(tok, hybrid_prob)
    return encoder.requires_grad_(False).eval(), decoder.eval()
