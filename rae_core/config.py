"""Typed schema of params.yaml.

Every section is a pydantic model whose defaults are the embedded default (`tiny` preset).
Loading validates a nested dict against the schema: unknown keys, wrong types and out-of-range
values raise ConfigError with one line naming the key, the bad value and what would be valid.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from rae_core.errors import ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _float_string(value: Any) -> Any:
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-4` as a string
    return value


_T = TypeVar("_T")
# Strict float (ints are accepted, bools are not) that also takes a numeric string.
Float = Annotated[float, BeforeValidator(_float_string)]
# Strict list that also takes a tuple, as params built in Python may hold one.
ListOf = Annotated[list[_T], BeforeValidator(lambda v: list(v) if isinstance(v, tuple) else v)]
# The arithmetic of a stage's models on a GPU (rae_core.device.autocast); the CPU is always fp32.
Precision = Literal["fp32", "bf16"]


class _Schema(BaseModel):
    # strict: an int field refuses 1.5, "3" and True; a str field refuses numbers
    model_config = ConfigDict(extra="forbid", strict=True)


class LoaderConfig(_Schema):
    """DataLoader processes that decode training images ahead of the step that needs them."""

    workers: int = Field(0, ge=0)  # 0: decoded in the training process itself
    prefetch: int = Field(2, ge=1)  # batches each worker reads ahead
    pin_memory: bool = True  # page-locked batches for faster copies (on a CUDA device only)


class DataConfig(_Schema):
    dataset: Literal["digits", "photos", "folder"] = "digits"
    source: str | None = None  # an existing image folder (train/, val/ with class sub-folders)
    root: str = "data/dataset"  # where `prepare` materialises the digits or links `source`
    resolution: int = Field(32, ge=8, le=2048)
    val_fraction: Float = Field(0.2, gt=0.0, le=0.9)
    num_classes: int = Field(10, ge=1, le=100000)
    # photos: crops per photo, train and val together (None: 225); stored at max(32, resolution)
    per_class: int | None = Field(None, ge=2)
    # Horizontal flips as augmentation of the generator's data (ADM/ImageNet: on). Off for
    # digits, where a mirrored 2 is not a 2.
    hflip: bool = False
    # splits of at most this many images are decoded once and held in memory; larger ones
    # (ImageNet's 50,000-image val: ~39 GB at 256 px) are decoded per batch
    max_in_memory: int = Field(10_000, ge=0)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)


class PretrainConfig(_Schema):
    """MAE pretraining of the small encoder (only for encoders the platform pretrains itself)."""

    steps: int = Field(400, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: Float = Field(1.5e-3, gt=0.0)
    weight_decay: Float = Field(0.05, ge=0.0)
    warmup_steps: int = Field(40, ge=0)
    mask_ratio: Float = Field(0.75, ge=0.0, le=0.99)
    ckpt_every: int = Field(200, ge=1)
    # non-finite steps in a row before the last checkpoint is restored with a remedy, and as
    # many again after it before the run stops (rae_core.train.common.NonFiniteGuard)
    nonfinite_patience: int = Field(10, ge=1)


class EncoderConfig(_Schema):
    name: str = "mae-tiny"
    weights: str | None = None  # local weights file; None = pretrained here (mae-*) or hub cache
    # a timm encoder's architecture with untrained (seeded) weights: the rehearsal preset only,
    # whose latents have the paper's shapes but no pretrained features
    random_init: bool = False
    # a random-init timm encoder's depth, width and heads replaced where set (shrunk for tests)
    depth: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    def overrides(self) -> dict[str, int]:
        """timm's names for the architecture settings params replace."""
        pairs = (("depth", self.depth), ("embed_dim", self.width), ("num_heads", self.heads))
        return {k: v for k, v in pairs if v is not None}


class AutoencoderConfig(_Schema):
    """The family of the latent space: `rae` (frozen representation encoder + ViT decoder, the
    paper), `vae` (a diffusers AutoencoderKL, DiT's recipe) or `hybrid-vq` (HART's multi-scale
    VQ tokenizer whose latent keeps the continuous residual). For `vae` and `hybrid-vq`,
    encoder.name names a registered config (rae_core.vae, rae_core.hybrid_vq) and
    encoder.weights a local weights file or folder; without one, pretrain-encoder trains it."""

    kind: Literal["rae", "vae", "hybrid-vq"] = "rae"
    config: str | None = None  # vae: local diffusers config folder for a single-file checkpoint
    # vae: latents are multiplied by this; None = 1/std measured by `stats` (SD-VAE: 0.18215)
    scale: Float | None = Field(None, gt=0.0)
    kl_weight: Float = Field(1e-6, ge=0.0)  # vae pretraining: weight of the KL term beside L1
    finetune_decoder: bool = False  # vae: train-decoder fine-tunes the decoder (SD's ft-EMA)
    # hybrid-vq: the registered tokenizer's vocabulary, latent channels and token-map sides
    # (the last = the latent's side), replaced where set
    vocab: int | None = Field(None, ge=2)
    channels: int | None = Field(None, ge=1)
    scales: ListOf[int] | None = None
    # hybrid-vq, train-decoder (HART's phase 2): the share of samples decoded from the hybrid
    # latent (discrete + residual) instead of the discrete one
    hybrid_prob: Float = Field(0.5, ge=0.0, le=1.0)


class StatsConfig(_Schema):
    batch_size: int = Field(256, ge=1)
    shards: int = Field(2, ge=1)  # parallel workers; the merge is exact whatever the count


class ExtractConfig(_Schema):
    enabled: bool = True  # False: training stages encode images on the fly
    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(512, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gpu_decode: bool = False  # JPEGs decoded on the GPU (nvJPEG) in batches; needs CUDA
    precision: Precision = "fp32"  # bf16: the encoder under bf16 autocast, on a GPU only


class GanConfig(_Schema):
    disc: Literal["small", "dino"] = "small"
    disc_weights: str | None = None  # local DINO ViT-S/8 weights for disc = dino
    weight: Float = Field(0.75, ge=0.0)
    disc_start_step: int = Field(300, ge=0)
    gen_start_step: int = Field(400, ge=0)
    disc_lr: Float = Field(2e-4, gt=0.0)
    diffaug: bool = True


class RefineConfig(_Schema):
    """A residual convolution over the decoder's unpatchified output (rae_core.decoder.Refine):
    neighbouring patches, painted by separate tokens, can then agree across their shared edges.
    channels = 0: none, the plain ViT decoder of the paper."""

    channels: int = Field(0, ge=0)  # hidden channels of conv(3 -> c), GELU, conv(c -> 3)
    kernel: Literal[3, 5] = 3


class DecoderConfig(_Schema):
    model: str = "ViT-tiny"
    # the registered ViT's width (MLP 4x), depth and heads replaced where set
    hidden: int | None = Field(None, ge=1)
    depth: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    patch_size: int = Field(8, ge=1)
    weights: str | None = None  # a released reference decoder (rae_core.released) instead of training one
    refine: RefineConfig = Field(default_factory=RefineConfig)
    noise_tau: Float = Field(0.8, ge=0.0)
    noise_law: Literal["paper", "reference"] = "paper"
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: Float = Field(1e-3, gt=0.0)
    min_lr: Float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(40, ge=0)
    betas: ListOf[Float] = Field(default_factory=lambda: [0.9, 0.95])
    weight_decay: Float = Field(0.0, ge=0.0)
    ema: Float = Field(0.99, ge=0.0, le=1.0)
    lpips_weight: Float = Field(0.0, ge=0.0)  # no VGG weights offline: L1 + GAN in the embedded default
    lpips_weights: str | None = None  # local torchvision vgg16 state dict for LPIPS
    gan: GanConfig = Field(default_factory=GanConfig)
    eval_every: int = Field(300, ge=1)
    ckpt_every: int = Field(200, ge=1)
    nonfinite_patience: int = Field(10, ge=1)  # as encoder.pretrain.nonfinite_patience

    def overrides(self) -> dict[str, int]:
        """The registered decoder's width, depth and heads replaced where params set them."""
        pairs = (("width", self.hidden), ("depth", self.depth), ("heads", self.heads))
        return {k: v for k, v in pairs if v is not None}


class WeakConfig(_Schema):
    """AutoGuidance's weak model, trained by train-generator after the main one on the same
    latents (generator settings, with these replaced) into models/generator/weak/ema.pt.
    model = None: none is trained (the weak model is a file given by sample.weak_model)."""

    model: str | None = None
    steps: int = Field(100, ge=1)
    hidden: int | None = Field(None, ge=1)
    depth: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    head_hidden: int | None = Field(None, ge=1)


# (section, key) of settings that only say which files are kept
RETENTION_KEYS = (("generator", "keep_snapshots"),)
# how a result is computed (loader processes, pinned memory), never what it is: left out of the
# fingerprint like retention, so changing one resumes a run; paths of nested keys
EXECUTION_KEYS: tuple[tuple[str, ...], ...] = (
    ("data", "loader"), ("data", "max_in_memory"), ("extract", "gpu_decode"))


class GeneratorConfig(_Schema):
    """The generator and its objective: `flow` (flow matching, RAE's DiT / DiT-DH), `ddpm`
    (IDDPM Gaussian diffusion with learned variance, DiT's recipe) or `hart` (a scale-wise
    autoregressive VAR / HART over a hybrid-vq tokenizer's tokens)."""

    kind: Literal["flow", "ddpm", "hart"] = "flow"
    model: str = "DiTDH-tiny"
    weights: str | None = None  # a released reference DiT-DH (rae_core.released) instead of ema.pt
    hidden: int | None = Field(None, ge=1)  # overrides of the registered config (ablations)
    depth: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    patch: int | None = Field(None, ge=1)  # a token is a patch x patch square (2 on a 4x8x8 VAE latent)
    head_hidden: int | None = Field(None, ge=1)  # DiT-DH: the width of its head
    steps: int = Field(700, ge=1)
    batch_size: int = Field(128, ge=1)  # global batch, split across workers and accumulation steps
    grad_accum: int = Field(1, ge=1)
    lr: Float = Field(2e-3, gt=0.0)
    min_lr: Float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    decay_start_step: int = Field(350, ge=0)  # constant lr until here, then linear decay to min_lr
    betas: ListOf[Float] = Field(default_factory=lambda: [0.9, 0.95])
    weight_decay: Float = Field(0.0, ge=0.0)
    ema: Float = Field(0.995, ge=0.0, le=1.0)
    grad_clip: Float = Field(1.0, ge=0.0)
    time_dist: Literal["logit_normal", "uniform"] = "logit_normal"
    shift_base: Float = Field(4096.0, ge=1.0)
    shift: Float | None = Field(None, gt=0.0)  # None = sqrt(tokens * channels / base)
    label_dropout: Float = Field(0.1, ge=0.0, le=1.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    latents: Literal["shards", "online"] = "shards"
    # hart: loss = token cross-entropy + residual_weight x the residual head's diffusion loss,
    # each a per-token mean; the head learns residual / residual_scale (None = 3 x the
    # residual's RMS, measured by `stats`, so it lies in the [-1, 1] its sampler clips to);
    # MAR's masking trains the head on a random 50-100 % of the last-scale positions
    residual_weight: Float = Field(1.0, ge=0.0)
    residual_scale: Float | None = Field(None, gt=0.0)
    mask_ratio: ListOf[Float] = Field(default_factory=lambda: [0.5, 1.0])
    sample_every: int = Field(350, ge=1)
    ckpt_every: int = Field(200, ge=1)  # also an EMA snapshot (runs/checkpoints/.../ema-step*.pt)
    keep_snapshots: int = Field(0, ge=0)  # EMA snapshots kept, spread over the steps; 0 = all
    nonfinite_patience: int = Field(10, ge=1)  # as encoder.pretrain.nonfinite_patience
    weak: WeakConfig = Field(default_factory=WeakConfig)

    def overrides(self) -> dict[str, int]:
        """The registered model config's width, depth, heads, patch and DiT-DH head width
        replaced where params set them."""
        pairs = (("hidden", self.hidden), ("depth", self.depth), ("heads", self.heads),
                 ("patch", self.patch), ("head_hidden", self.head_hidden))
        return {k: v for k, v in pairs if v is not None}


class SampleConfig(_Schema):
    num_per_class: int = Field(50, ge=1)
    # flow: euler/heun; ddpm: ddpm/ddim; hart: scalewise (next-scale tokens, then the head)
    sampler: Literal["euler", "heun", "ddpm", "ddim", "scalewise"] = "euler"
    # ODE steps (flow), respaced diffusion steps (ddpm), the residual head's steps (hart)
    steps: int = Field(50, ge=2)
    guidance: Literal["none", "cfg", "autoguidance"] = "cfg"
    scale: Float = Field(5.0, ge=0.0)
    interval: ListOf[Float] = Field(default_factory=lambda: [0.0, 1.0])
    weak_model: str | None = None  # AutoGuidance: a checkpoint file of a weaker/earlier model
    # CFG on every latent channel, or only on the first 3 of 4 as DiT's reference code does
    cfg_channels: Literal["all", "first3"] = "all"
    # hart: top-k / top-p filtering of the token logits (0 / 1.0: off), and the residual head
    # on (HART) or off (discrete tokens only, VAR's output)
    top_k: int = Field(0, ge=0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    residual: bool = True
    batch_size: int = Field(250, ge=1)
    shard_size: int = Field(250, ge=1)
    seed: int = Field(0, ge=0)
    precision: Precision = "fp32"  # bf16: generator and decoder under bf16 autocast, GPU only


class EvaluateConfig(_Schema):
    extractor: Literal["domain", "inception"] = "domain"
    inception_weights: str | None = None  # local inception-2015-12-05.pt for extractor = inception
    # an ADM reference batch (.npz: arr_0 images and/or mu, sigma) instead of the training split:
    # the paper's protocol (rae_core.metrics.adm); needs extractor = inception
    reference: str | None = None
    classifier_epochs: int = Field(15, ge=1)
    pr_k: int = Field(3, ge=1)
    curve_per_class: int = Field(10, ge=0)  # samples per class for FID at each checkpoint; 0 = off
    batch_size: int = Field(250, ge=1)
    # bf16: reconstructions and the curve's samples under bf16 autocast, on a GPU only; the
    # feature extractors and FID's statistics stay fp32/float64
    precision: Precision = "fp32"


class RayConfig(_Schema):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    # How long a driver on an autoscaling cluster waits for the nodes it asked for; 0 stops at
    # once when the cluster is smaller than num_workers x cpus_per_worker.
    scale_up_timeout_s: Float = Field(0.0, ge=0.0)


class TrackingConfig(_Schema):
    experiment: str = "rae"


class ToleranceConfig(_Schema):
    """How far a reproduction's metric may lie from its baseline (absolute) before it drifts."""

    fid: Float = Field(0.5, ge=0.0)
    precision: Float = Field(0.03, ge=0.0)
    recall: Float = Field(0.03, ge=0.0)
    class_accuracy: Float = Field(0.02, ge=0.0)
    recon_psnr: Float = Field(0.3, ge=0.0)
    rfid: Float = Field(0.5, ge=0.0)


class ScheduleConfig(_Schema):
    nightly: str = "0 3 * * *"  # cron of the `smoke` reproducibility run
    weekly: str = "0 4 * * 0"  # cron of the `tiny` reproducibility run
    experiment: str = "rae-reproduce"  # reproductions stay off the leaderboard's experiment
    tolerance: ToleranceConfig = Field(default_factory=ToleranceConfig)


class Config(_Schema):
    preset: str = "tiny"
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict:
        return self.model_dump()

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as logged to MLflow."""
        return flatten(self.to_dict())

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections (all when none): keys checkpoints and outputs.
        Settings of what is kept, not of what is computed, are left out: changing one resumes."""
        d = self.to_dict()
        for *parents, key in RETENTION_KEYS + EXECUTION_KEYS:
            node = d
            for part in parents:
                node = node[part]
            node.pop(key)
        picked = {s: d[s] for s in sections} if sections else d
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        # ValueError, so that pydantic reports it; from_dict turns it into a ConfigError
        if self.data.dataset == "folder" and not self.data.source:
            raise ValueError("data.source: null is not valid with data.dataset=folder; "
                             "give the path of an image folder with train/ and val/ sub-folders")
        if self.evaluate.reference and self.evaluate.extractor != "inception":
            raise ValueError(f"evaluate.reference: an ADM batch holds Inception statistics; set "
                             f"evaluate.extractor=inception (got {self.evaluate.extractor!r})")
        g, s = self.generator, self.sample
        if g.batch_size % (g.grad_accum * self.ray.num_workers):
            raise ValueError(f"generator.batch_size: {g.batch_size} is not divisible by "
                             f"generator.grad_accum x ray.num_workers = "
                             f"{g.grad_accum * self.ray.num_workers}")
        lo, hi = s.interval if len(s.interval) == 2 else (None, None)
        if lo is None or not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"sample.interval: {s.interval!r} is not valid; "
                             "expected [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1")
        samplers = SAMPLERS[g.kind]
        if s.sampler not in samplers:
            raise ValueError(f"sample.sampler: {s.sampler!r} is not valid with "
                             f"generator.kind={g.kind}; expected one of {', '.join(samplers)}")
        if g.kind in ("ddpm", "hart") and s.guidance == "autoguidance":
            raise ValueError(f"sample.guidance: 'autoguidance' is not valid with generator.kind="
                             f"{g.kind}; expected 'none' or 'cfg'")
        if (g.kind == "hart") != (self.autoencoder.kind == "hybrid-vq"):
            raise ValueError(f"generator.kind: {g.kind!r} is not valid with "
                             f"autoencoder.kind={self.autoencoder.kind}; 'hart' generates the "
                             "tokens of a 'hybrid-vq' tokenizer, and only it")
        lo, hi = g.mask_ratio if len(g.mask_ratio) == 2 else (None, None)
        if lo is None or not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"generator.mask_ratio: {g.mask_ratio!r} is not valid; "
                             "expected [lo, hi] with 0 < lo <= hi <= 1")
        e = self.encoder
        if e.random_init and self.preset != "rehearsal":
            raise ValueError(f"encoder.random_init: true is not valid in preset {self.preset!r}; "
                             "untrained encoder weights are for the rehearsal preset only")
        if not e.random_init and (key := next((k for k in ("depth", "width", "heads")
                                                if getattr(e, k) is not None), None)):
            raise ValueError(f"encoder.{key}: {getattr(e, key)} is not valid with "
                             "encoder.random_init=false; only an untrained encoder's "
                             "architecture may change")
        if s.guidance == "autoguidance" and not s.weak_model:
            raise ValueError("sample.weak_model: null is not valid with "
                             "sample.guidance=autoguidance; give a checkpoint file of the weaker model")
        return self


SAMPLERS = {"flow": ("euler", "heun"), "ddpm": ("ddpm", "ddim"), "hart": ("scalewise",)}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_dict(data: dict) -> Config:
    """Validate a nested dict (params.yaml) into a Config; missing keys take their defaults."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        # pydantic reports every error; the first in the input's key order is the one named
        first = min(e.errors(), key=lambda err: _position(data, err["loc"]))
        raise ConfigError(_message(data, first)) from None


def _position(data: Any, loc: tuple) -> list[int]:
    """Where `loc` lies in the input: the index of each of its keys (or items) in turn."""
    pos, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            pos.append(list(node).index(part))
        elif isinstance(node, list | tuple) and isinstance(part, int):
            pos.append(part)
        else:
            break
        node = node[part]
    return pos


def _message(data: Any, err: dict) -> str:
    """One line for a pydantic error: the dotted key, the bad value and what would be valid."""
    if err["type"] == "value_error" and not err["loc"]:
        return str(err["ctx"]["error"])  # a cross-field check of Config
    cls, path, rest, value = Config, [], list(err["loc"]), data
    while rest and isinstance(cls, type) and rest[0] in cls.model_fields:
        path.append(rest.pop(0))
        info = cls.model_fields[path[-1]]
        cls, value = info.annotation, value[path[-1]]
    key = ".".join(path)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        if not rest:
            return f"{key or 'params'}: expected a mapping, got {value!r}"
        prefix = key + "." if key else ""
        close = difflib.get_close_matches(str(rest[0]), list(cls.model_fields), n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        valid = ", ".join(prefix + k for k in cls.model_fields)
        return f"{prefix}{rest[0]}: unknown key{hint} (valid keys: {valid})"
    if err["type"] in ("greater_than", "greater_than_equal", "less_than_equal"):
        value = float(err["input"]) if _base(cls) is float else err["input"]
        left, lo, hi = "[", "-inf", "inf"
        for m in info.metadata:
            if isinstance(m, Ge):
                lo = m.ge
            elif isinstance(m, Gt):
                left, lo = "(", m.gt
            elif isinstance(m, Le):
                hi = m.le
        return f"{key}: {value!r} is out of range; valid values lie in {left}{lo}, {hi}]"
    if rest and typing.get_origin(cls) is list:  # one item of a list (not of an optional one)
        value, cls = err["input"], typing.get_args(cls)[0]
    return f"{key}: {value!r} is not valid; expected {_type_name(cls)}"


def _is_union(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


def _base(tp: Any) -> Any:
    """The type under Annotated and `| None`."""
    if typing.get_origin(tp) is Annotated:
        return _base(typing.get_args(tp)[0])
    if _is_union(tp):
        return _base(next(a for a in typing.get_args(tp) if a is not type(None)))
    return tp


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` with a YAML-typed value (so `3` is an int, `null` None, `[0, 1]` a list)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. generator.steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict; unknown keys are left for validation to name."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"{key}: {parts[0]}... is not a section; cannot set {key}")
            node = node[part]
        node[parts[-1]] = value
    return data


def merge(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
