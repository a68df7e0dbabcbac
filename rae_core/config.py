"""Typed schema of params.yaml.

Every section is a dataclass whose defaults are the embedded default (`tiny` preset). Loading
validates a nested dict against the schema: unknown keys, wrong types and out-of-range values
raise ConfigError with one line naming the key, the bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from rae_core.errors import ConfigError


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


def _f(default: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    return field(default=default, metadata=_range(lo, hi, lo_open=lo_open))


@dataclass
class DataConfig:
    dataset: Literal["digits", "folder"] = "digits"
    source: str | None = None  # an existing image folder (train/, val/ with class sub-folders)
    root: str = "data/dataset"  # where `prepare` materialises the digits or links `source`
    resolution: int = _f(32, 8, 2048)
    val_fraction: float = _f(0.2, 0.0, 0.9, lo_open=True)
    num_classes: int = _f(10, 1, 100000)
    # Horizontal flips as augmentation of the generator's data (ADM/ImageNet: on). Off for
    # digits, where a mirrored 2 is not a 2.
    hflip: bool = False


@dataclass
class PretrainConfig:
    """MAE pretraining of the small encoder (only for encoders the platform pretrains itself)."""

    steps: int = _f(400, 1)
    batch_size: int = _f(128, 1)
    lr: float = _f(1.5e-3, 0.0, lo_open=True)
    weight_decay: float = _f(0.05, 0.0)
    warmup_steps: int = _f(40, 0)
    mask_ratio: float = _f(0.75, 0.0, 0.99)
    ckpt_every: int = _f(200, 1)


@dataclass
class EncoderConfig:
    name: str = "mae-tiny"
    weights: str | None = None  # local weights file; None = pretrained here (mae-*) or hub cache
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class AutoencoderConfig:
    """The family of the latent space: `rae` (frozen representation encoder + ViT decoder, the
    paper), `vae` (a diffusers AutoencoderKL, DiT's recipe) or `hybrid-vq` (HART's multi-scale
    VQ tokenizer whose latent keeps the continuous residual). For `vae` and `hybrid-vq`,
    encoder.name names a registered config (rae_core.vae, rae_core.hybrid_vq) and
    encoder.weights a local weights file or folder; without one, pretrain-encoder trains it."""

    kind: Literal["rae", "vae", "hybrid-vq"] = "rae"
    config: str | None = None  # vae: local diffusers config folder for a single-file checkpoint
    # vae: latents are multiplied by this; None = 1/std measured by `stats` (SD-VAE: 0.18215)
    scale: float | None = _f(None, 0.0, lo_open=True)
    kl_weight: float = _f(1e-6, 0.0)  # vae pretraining: weight of the KL term beside L1
    finetune_decoder: bool = False  # vae: train-decoder fine-tunes the decoder (SD's ft-EMA)
    # hybrid-vq: the registered tokenizer's vocabulary, latent channels and token-map sides
    # (the last = the latent's side), replaced where set
    vocab: int | None = _f(None, 2)
    channels: int | None = _f(None, 1)
    scales: list[int] | None = None
    # hybrid-vq, train-decoder (HART's phase 2): the share of samples decoded from the hybrid
    # latent (discrete + residual) instead of the discrete one
    hybrid_prob: float = _f(0.5, 0.0, 1.0)


@dataclass
class StatsConfig:
    batch_size: int = _f(256, 1)
    shards: int = _f(2, 1)  # parallel workers; the merge is exact whatever the count


@dataclass
class ExtractConfig:
    enabled: bool = True  # False: training stages encode images on the fly
    batch_size: int = _f(256, 1)
    shard_size: int = _f(512, 1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class GanConfig:
    disc: Literal["small", "dino"] = "small"
    disc_weights: str | None = None  # local DINO ViT-S/8 weights for disc = dino
    weight: float = _f(0.75, 0.0)
    disc_start_step: int = _f(300, 0)
    gen_start_step: int = _f(400, 0)
    disc_lr: float = _f(2e-4, 0.0, lo_open=True)
    diffaug: bool = True


@dataclass
class DecoderConfig:
    model: str = "ViT-tiny"
    patch_size: int = _f(8, 1)
    noise_tau: float = _f(0.8, 0.0)
    noise_law: Literal["paper", "reference"] = "paper"
    steps: int = _f(600, 1)
    batch_size: int = _f(64, 1)
    lr: float = _f(1e-3, 0.0, lo_open=True)
    min_lr: float = _f(1e-4, 0.0)
    warmup_steps: int = _f(40, 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = _f(0.0, 0.0)
    ema: float = _f(0.99, 0.0, 1.0)
    lpips_weight: float = _f(0.0, 0.0)  # no VGG weights offline: L1 + GAN in the embedded default
    lpips_weights: str | None = None  # local torchvision vgg16 state dict for LPIPS
    gan: GanConfig = field(default_factory=GanConfig)
    eval_every: int = _f(300, 1)
    ckpt_every: int = _f(200, 1)


@dataclass
class GeneratorConfig:
    """The generator and its objective: `flow` (flow matching, RAE's DiT / DiT-DH), `ddpm`
    (IDDPM Gaussian diffusion with learned variance, DiT's recipe) or `hart` (a scale-wise
    autoregressive VAR / HART over a hybrid-vq tokenizer's tokens)."""

    kind: Literal["flow", "ddpm", "hart"] = "flow"
    model: str = "DiTDH-tiny"
    hidden: int | None = _f(None, 1)  # overrides of the registered config (ablations)
    depth: int | None = _f(None, 1)
    heads: int | None = _f(None, 1)
    patch: int | None = _f(None, 1)  # a token is a patch x patch square (2 on a 4x8x8 VAE latent)
    head_hidden: int | None = _f(None, 1)  # DiT-DH: the width of its head
    steps: int = _f(800, 1)
    batch_size: int = _f(128, 1)  # global batch, split across workers and accumulation steps
    grad_accum: int = _f(1, 1)
    lr: float = _f(2e-3, 0.0, lo_open=True)
    min_lr: float = _f(1e-4, 0.0)
    warmup_steps: int = _f(100, 0)
    decay_start_step: int = _f(400, 0)  # constant lr until here, then linear decay to min_lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = _f(0.0, 0.0)
    ema: float = _f(0.995, 0.0, 1.0)
    grad_clip: float = _f(1.0, 0.0)
    time_dist: Literal["logit_normal", "uniform"] = "logit_normal"
    shift_base: float = _f(4096.0, 1.0)
    shift: float | None = _f(None, 0.0, lo_open=True)  # None = sqrt(tokens * channels / base)
    label_dropout: float = _f(0.1, 0.0, 1.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    latents: Literal["shards", "online"] = "shards"
    # hart: loss = token cross-entropy + residual_weight x the residual head's diffusion loss,
    # each a per-token mean; the head learns residual / residual_scale (None = 3 x the
    # residual's RMS, measured by `stats`, so it lies in the [-1, 1] its sampler clips to);
    # MAR's masking trains the head on a random 50-100 % of the last-scale positions
    residual_weight: float = _f(1.0, 0.0)
    residual_scale: float | None = _f(None, 0.0, lo_open=True)
    mask_ratio: list[float] = field(default_factory=lambda: [0.5, 1.0])
    sample_every: int = _f(400, 1)
    ckpt_every: int = _f(200, 1)

    def overrides(self) -> dict[str, int]:
        """The registered model config's width, depth, heads, patch and DiT-DH head width
        replaced where params set them."""
        pairs = (("hidden", self.hidden), ("depth", self.depth), ("heads", self.heads),
                 ("patch", self.patch), ("head_hidden", self.head_hidden))
        return {k: v for k, v in pairs if v is not None}


@dataclass
class SampleConfig:
    num_per_class: int = _f(50, 1)
    # flow: euler/heun; ddpm: ddpm/ddim; hart: scalewise (next-scale tokens, then the head)
    sampler: Literal["euler", "heun", "ddpm", "ddim", "scalewise"] = "euler"
    # ODE steps (flow), respaced diffusion steps (ddpm), the residual head's steps (hart)
    steps: int = _f(50, 2)
    guidance: Literal["none", "cfg", "autoguidance"] = "cfg"
    scale: float = _f(5.0, 0.0)
    interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    weak_model: str | None = None  # AutoGuidance: a checkpoint file of a weaker/earlier model
    # CFG on every latent channel, or only on the first 3 of 4 as DiT's reference code does
    cfg_channels: Literal["all", "first3"] = "all"
    # hart: top-k / top-p filtering of the token logits (0 / 1.0: off), and the residual head
    # on (HART) or off (discrete tokens only, VAR's output)
    top_k: int = _f(0, 0)
    top_p: float = _f(1.0, 0.0, 1.0, lo_open=True)
    residual: bool = True
    batch_size: int = _f(250, 1)
    shard_size: int = _f(250, 1)
    seed: int = _f(0, 0)


@dataclass
class EvaluateConfig:
    extractor: Literal["domain", "inception"] = "domain"
    inception_weights: str | None = None  # local inception-2015-12-05.pt for extractor = inception
    classifier_epochs: int = _f(15, 1)
    pr_k: int = _f(3, 1)
    curve_per_class: int = _f(10, 0)  # samples per class for FID at each checkpoint; 0 = off
    batch_size: int = _f(250, 1)


@dataclass
class RayConfig:
    num_workers: int = _f(1, 1)
    use_gpu: bool = False
    cpus_per_worker: int = _f(1, 1)
    # How long a driver on an autoscaling cluster waits for the nodes it asked for; 0 stops at
    # once when the cluster is smaller than num_workers x cpus_per_worker.
    scale_up_timeout_s: float = _f(0.0, 0.0)


@dataclass
class TrackingConfig:
    experiment: str = "rae"


@dataclass
class ToleranceConfig:
    """How far a reproduction's metric may lie from its baseline (absolute) before it drifts."""

    fid: float = _f(0.5, 0.0)
    precision: float = _f(0.03, 0.0)
    recall: float = _f(0.03, 0.0)
    class_accuracy: float = _f(0.02, 0.0)
    recon_psnr: float = _f(0.3, 0.0)
    rfid: float = _f(0.5, 0.0)


@dataclass
class ScheduleConfig:
    nightly: str = "0 3 * * *"  # cron of the `smoke` reproducibility run
    weekly: str = "0 4 * * 0"  # cron of the `tiny` reproducibility run
    experiment: str = "rae-reproduce"  # reproductions stay off the leaderboard's experiment
    tolerance: ToleranceConfig = field(default_factory=ToleranceConfig)


@dataclass
class Config:
    preset: str = "tiny"
    seed: int = _f(0, 0)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as logged to MLflow."""
        return flatten(self.to_dict())

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections (all when none): keys checkpoints and outputs."""
        d = self.to_dict()
        picked = {s: d[s] for s in sections} if sections else d
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif isinstance(tp, types.UnionType) or origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list | tuple):
            return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: {value!r} is not valid; expected {_type_name(tp)}")


def _check_range(value: Any, meta: Any, key: str) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if value is None or (lo is None and hi is None):
        return
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and value > hi
    if low_bad or high_bad:
        left = "(" if lo_open else "["
        rng = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key}: {value!r} is out of range; valid values lie in {rng}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            valid = ", ".join(prefix + k for k in fields)
            raise ConfigError(f"{dotted}: unknown key{hint} (valid keys: {valid})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
            _check_range(kwargs[key], fields[key].metadata, dotted)
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    """Validate a nested dict (params.yaml) into a Config; missing keys take their defaults."""
    cfg = _build(Config, data, "")
    _check_consistency(cfg)
    return cfg


SAMPLERS = {"flow": ("euler", "heun"), "ddpm": ("ddpm", "ddim"), "hart": ("scalewise",)}


def _check_consistency(cfg: Config) -> None:
    if cfg.data.dataset == "folder" and not cfg.data.source:
        raise ConfigError("data.source: null is not valid with data.dataset=folder; "
                          "give the path of an image folder with train/ and val/ sub-folders")
    if cfg.generator.batch_size % (cfg.generator.grad_accum * cfg.ray.num_workers):
        raise ConfigError(f"generator.batch_size: {cfg.generator.batch_size} is not divisible by "
                          f"generator.grad_accum x ray.num_workers = "
                          f"{cfg.generator.grad_accum * cfg.ray.num_workers}")
    lo, hi = cfg.sample.interval if len(cfg.sample.interval) == 2 else (None, None)
    if lo is None or not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"sample.interval: {cfg.sample.interval!r} is not valid; "
                          "expected [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1")
    samplers = SAMPLERS[cfg.generator.kind]
    if cfg.sample.sampler not in samplers:
        raise ConfigError(f"sample.sampler: {cfg.sample.sampler!r} is not valid with "
                          f"generator.kind={cfg.generator.kind}; expected one of "
                          f"{', '.join(samplers)}")
    if cfg.generator.kind in ("ddpm", "hart") and cfg.sample.guidance == "autoguidance":
        raise ConfigError(f"sample.guidance: 'autoguidance' is not valid with generator.kind="
                          f"{cfg.generator.kind}; expected 'none' or 'cfg'")
    if (cfg.generator.kind == "hart") != (cfg.autoencoder.kind == "hybrid-vq"):
        raise ConfigError(f"generator.kind: {cfg.generator.kind!r} is not valid with "
                          f"autoencoder.kind={cfg.autoencoder.kind}; 'hart' generates the tokens "
                          "of a 'hybrid-vq' tokenizer, and only it")
    lo, hi = cfg.generator.mask_ratio if len(cfg.generator.mask_ratio) == 2 else (None, None)
    if lo is None or not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"generator.mask_ratio: {cfg.generator.mask_ratio!r} is not valid; "
                          "expected [lo, hi] with 0 < lo <= hi <= 1")
    if cfg.sample.guidance == "autoguidance" and not cfg.sample.weak_model:
        raise ConfigError("sample.weak_model: null is not valid with sample.guidance=autoguidance; "
                          "give a checkpoint file of the weaker model")


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
