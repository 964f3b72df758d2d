"""Typed, frozen configurations for every network and the noise schedule.

Field names are a serialised API (they are written next to checkpoints), so each says exactly what it
holds. Validation lives in ``__post_init__`` and raises a ``ValueError`` that says how to fix it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class PredictionType(str, enum.Enum):
    """What the U-Net predicts: the added noise (SD 1.x, SD 2 base) or v = alpha*eps - sigma*x0 (SD 2 768)."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class BetaSchedule(str, enum.Enum):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"  # linear in sqrt(beta): the Stable Diffusion schedule
    SQUAREDCOS_CAP_V2 = "squaredcos_cap_v2"  # cosine schedule of Nichol & Dhariwal 2021


class TimestepSpacing(str, enum.Enum):
    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be positive; got {value}")


@dataclass(frozen=True)
class UNetConfig:
    """The conditional U-Net. Exactly one of ``num_heads`` (SD 1: a fixed count) and ``head_dim``
    (SD 2, SDXL: 64-wide heads, the count grows with the width) is set.

    ``transformer_depth`` holds one count of transformer blocks per level (SDXL: 1, 2, 10); an int, as
    configs written before per-level depths hold it, means that count at every level.
    ``mid_transformer_depth``: the middle block's; None takes the last level's (diffusers' rule).
    SDXL's added embedding ("text_time"): the U-Net also takes a vector ``y`` = [pooled text (pooled_dim) |
    ``micro_conditions`` numbers (sizes, crop, aesthetic score), each as ``micro_condition_dim`` sinusoidal
    features], which a 2-layer MLP adds to the time embedding. ``pooled_dim`` 0 = no added embedding."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | None = 8
    head_dim: int | None = None
    transformer_depth: tuple[int, ...] | int = 1
    mid_transformer_depth: int | None = None
    context_dim: int = 768
    use_linear_projection: bool = False
    norm_groups: int = 32
    pooled_dim: int = 0
    micro_conditions: int = 0
    micro_condition_dim: int = 256

    def __post_init__(self) -> None:
        _check_positive("UNetConfig", in_channels=self.in_channels, out_channels=self.out_channels,
                        model_channels=self.model_channels, num_res_blocks=self.num_res_blocks,
                        context_dim=self.context_dim, micro_condition_dim=self.micro_condition_dim)
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        levels = len(self.channel_mult)
        if len(self.attention_levels) != levels:
            raise ValueError(f"UNetConfig.attention_levels needs one flag per level "
                             f"({levels}); got {len(self.attention_levels)}")
        depth = self.transformer_depth
        depth = (depth,) * levels if isinstance(depth, int) else tuple(depth)
        # a level without attention builds no transformer; its entry is kept at 1 so that equal models have
        # equal configs whichever file they were read from
        if len(depth) != levels or any(d < (1 if a else 0) for d, a in zip(depth, self.attention_levels)):
            raise ValueError(f"UNetConfig.transformer_depth needs one positive count per level ({levels}), "
                             f"e.g. {(1,) * levels}; got {self.transformer_depth}")
        object.__setattr__(self, "transformer_depth",
                           tuple(d if a else 1 for d, a in zip(depth, self.attention_levels)))
        if self.mid_transformer_depth is None:
            object.__setattr__(self, "mid_transformer_depth", depth[-1])
        _check_positive("UNetConfig", mid_transformer_depth=self.mid_transformer_depth)
        if self.pooled_dim < 0 or self.micro_conditions < 0:
            raise ValueError("UNetConfig: pooled_dim and micro_conditions must be >= 0 (0 = no added embedding)")
        if (self.pooled_dim == 0) != (self.micro_conditions == 0):
            raise ValueError("UNetConfig: set both pooled_dim and micro_conditions (SDXL base: 1280 and 6) or "
                             "neither")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads (SD 1 style) and head_dim (SD 2 style)")
        for level, mult in enumerate(self.channel_mult):
            width = self.model_channels * mult
            if width % self.norm_groups:
                raise ValueError(f"UNetConfig: width {width} is not divisible by norm_groups={self.norm_groups}")
            # heads matter where there is attention: at each level that has it, and in the middle (the last)
            if not (self.attention_levels[level] or level == len(self.channel_mult) - 1):
                continue
            if self.head_dim is not None and width % self.head_dim:
                raise ValueError(f"UNetConfig: width {width} is not divisible by head_dim={self.head_dim}")
            if self.num_heads is not None and width % self.num_heads:
                raise ValueError(f"UNetConfig: width {width} is not divisible by num_heads={self.num_heads}")

    @property
    def added_embed_dim(self) -> int:
        """Width of the added vector ``y`` (SDXL base: 1280 + 6 * 256 = 2816); 0 without one."""
        return self.pooled_dim + self.micro_conditions * self.micro_condition_dim

    def heads_at(self, width: int) -> int:
        """Attention head count for a transformer of this channel width."""
        return self.num_heads if self.num_heads is not None else width // self.head_dim

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclass(frozen=True)
class VAEConfig:
    """KL autoencoder with downsampling factor 2**(len(channel_mult)-1)."""

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    # SD 3 and FLUX.1: latents = (z - shift_factor) * scaling_factor, and no 1x1 convs around the latent
    shift_factor: float = 0.0
    use_quant_conv: bool = True

    def __post_init__(self) -> None:
        _check_positive("VAEConfig", in_channels=self.in_channels, latent_channels=self.latent_channels,
                        base_channels=self.base_channels, num_res_blocks=self.num_res_blocks)
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if not self.scaling_factor > 0:
            raise ValueError(f"VAEConfig.scaling_factor must be positive; got {self.scaling_factor}")

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd3(cls) -> "VAEConfig":
        """stabilityai/stable-diffusion-3.5-* vae/config.json: 16 latent channels."""
        return cls(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False)

    @classmethod
    def flux(cls) -> "VAEConfig":
        """black-forest-labs/FLUX.1-* vae/config.json: 16 latent channels."""
        return cls(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False)


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer: causal, pre-LayerNorm, final LayerNorm."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP ViT-H)
    projection_dim: int = 768  # width of the joint text-image space (used by CLIP guidance and training)
    pad_token_id: int = 49407  # SD 1 pads with the end token, SD 2 with 0
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    # transformers' CLIPTextModelWithProjection: SDXL's OpenCLIP bigG projects its pooled output
    with_projection: bool = False

    def __post_init__(self) -> None:
        _check_positive("CLIPTextConfig", vocab_size=self.vocab_size, max_positions=self.max_positions,
                        width=self.width, num_layers=self.num_layers, num_heads=self.num_heads,
                        ffn_dim=self.ffn_dim, projection_dim=self.projection_dim)
        if self.width % self.num_heads:
            raise ValueError(f"CLIPTextConfig: width {self.width} is not divisible by num_heads={self.num_heads}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPTextConfig.activation must be 'quick_gelu' or 'gelu'; got {self.activation!r}")


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP image transformer (ViT): patches, class token, pre-LN blocks, post-LN, projection."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    activation: str = "quick_gelu"
    projection_dim: int = 768

    def __post_init__(self) -> None:
        _check_positive("CLIPVisionConfig", image_size=self.image_size, patch_size=self.patch_size,
                        width=self.width, num_layers=self.num_layers, num_heads=self.num_heads,
                        ffn_dim=self.ffn_dim, projection_dim=self.projection_dim)
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"CLIPVisionConfig: width {self.width} is not divisible by num_heads={self.num_heads}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPVisionConfig.activation must be 'quick_gelu' or 'gelu'; got {self.activation!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule and how inference picks timesteps from it."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = BetaSchedule.SCALED_LINEAR
    prediction_type: PredictionType = PredictionType.EPSILON
    timestep_spacing: TimestepSpacing = TimestepSpacing.LEADING
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        _check_positive("ScheduleConfig", num_train_timesteps=self.num_train_timesteps)
        object.__setattr__(self, "beta_schedule", _enum(BetaSchedule, self.beta_schedule, "beta_schedule"))
        object.__setattr__(self, "prediction_type", _enum(PredictionType, self.prediction_type, "prediction_type"))
        object.__setattr__(self, "timestep_spacing", _enum(TimestepSpacing, self.timestep_spacing, "timestep_spacing"))
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"ScheduleConfig: need 0 < beta_start < beta_end < 1; "
                             f"got {self.beta_start}, {self.beta_end}")
        if self.steps_offset < 0:
            raise ValueError(f"ScheduleConfig.steps_offset must be >= 0; got {self.steps_offset}")


def _enum(kind: type[enum.Enum], value: Any, name: str):
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(repr(v.value) for v in kind)
        raise ValueError(f"ScheduleConfig.{name} must be one of {valid}; got {value!r}") from None


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: the three networks, the schedule and how they are used."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # "sd1", "sd2", "sdxl" (CLIP-L + OpenCLIP bigG) or "sdxl_refiner" (bigG alone): decides how prompts
    # are encoded and the key layouts of single-file checkpoints
    family: str = "sd1"
    clip_skip: int = 1  # 1 = last hidden state; n = hidden state -n, then the final LayerNorm (SD 1/2)
    sample_size: int = 512  # default image width and height in pixels
    # SDXL base's second text encoder (OpenCLIP bigG with its projection); the refiner's only one is ``text``
    text_2: CLIPTextConfig | None = None

    FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")

    def __post_init__(self) -> None:
        if self.family not in self.FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {', '.join(self.FAMILIES)}; got {self.family!r}")
        if not 1 <= self.clip_skip <= self.text.num_layers:
            raise ValueError(f"ModelConfig.clip_skip must be in 1..{self.text.num_layers}; got {self.clip_skip}")
        if (self.text_2 is not None) != (self.family == "sdxl"):
            raise ValueError("ModelConfig.text_2 (the second text encoder) is set exactly for family 'sdxl'")
        if self.is_sdxl:
            # SDXL reads the penultimate hidden states of its encoders without the final LayerNorm: fixed
            if self.clip_skip != 1:
                raise ValueError("ModelConfig.clip_skip must be 1 for SDXL (its context is always the "
                                 "penultimate hidden states)")
            if not self.text_encoders[-1].with_projection:
                raise ValueError("ModelConfig: SDXL's last text encoder needs with_projection=True (its pooled "
                                 "output is projected)")
            pooled = self.text_encoders[-1].projection_dim
            if self.unet.pooled_dim != pooled:
                raise ValueError(f"ModelConfig: U-Net pooled_dim {self.unet.pooled_dim} must equal the last text "
                                 f"encoder's projection_dim {pooled}")
            if self.unet.micro_conditions != self.micro_conditions:
                raise ValueError(f"ModelConfig: the {self.family} U-Net takes {self.micro_conditions} "
                                 f"micro-conditioning numbers; its config says {self.unet.micro_conditions}")
        elif self.unet.pooled_dim:
            raise ValueError(f"ModelConfig: family {self.family!r} has no added embedding (pooled_dim must be 0)")
        if self.unet.context_dim != self.context_dim:
            raise ValueError(f"ModelConfig: U-Net context_dim {self.unet.context_dim} must equal the text "
                             f"encoders' width {self.context_dim}")
        if self.unet.in_channels not in (self.vae.latent_channels, 2 * self.vae.latent_channels + 1):
            raise ValueError(f"ModelConfig: U-Net in_channels {self.unet.in_channels} must be the VAE's "
                             f"latent channels ({self.vae.latent_channels}) or, for inpainting, "
                             f"{2 * self.vae.latent_channels + 1}")

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    @property
    def is_sdxl(self) -> bool:
        return self.family in ("sdxl", "sdxl_refiner")

    @property
    def text_encoders(self) -> tuple[CLIPTextConfig, ...]:
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    @property
    def context_dim(self) -> int:
        """Per-token width of the context: SDXL concatenates its encoders' states (768 + 1280 = 2048)."""
        return sum(t.width for t in self.text_encoders)

    @property
    def micro_conditions(self) -> int:
        """SDXL base: original size (h, w), crop top-left (top, left), target size (h, w); the refiner has
        an aesthetic score instead of the target size."""
        return {"sdxl": 6, "sdxl_refiner": 5}.get(self.family, 0)

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def sd15(cls) -> "ModelConfig":
        return cls()

    @classmethod
    def sd21_base(cls) -> "ModelConfig":
        return cls(
            unet=UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True),
            # diffusers and most tools drop the last of OpenCLIP's 24 layers: SD 2 reads the penultimate
            text=_openclip_h_text(num_layers=23),
            family="sd2",
        )

    @classmethod
    def sd21_v(cls) -> "ModelConfig":
        base = cls.sd21_base()
        return dataclasses.replace(
            base, schedule=dataclasses.replace(base.schedule, prediction_type=PredictionType.V_PREDICTION),
            sample_size=768)

    @classmethod
    def sdxl_base(cls) -> "ModelConfig":
        """stabilityai/stable-diffusion-xl-base-1.0: no attention at the top level, 1/2/10 blocks deep."""
        return cls(
            unet=UNetConfig(channel_mult=(1, 2, 4), attention_levels=(False, True, True), num_heads=None,
                            head_dim=64, transformer_depth=(1, 2, 10), context_dim=2048, use_linear_projection=True,
                            pooled_dim=1280, micro_conditions=6),
            vae=VAEConfig(scaling_factor=0.13025), text=CLIPTextConfig(), text_2=_openclip_bigg_text(),
            schedule=_sdxl_schedule(), family="sdxl", sample_size=1024)

    @classmethod
    def sdxl_refiner(cls) -> "ModelConfig":
        """stabilityai/stable-diffusion-xl-refiner-1.0: bigG alone; an aesthetic score for the target size."""
        return cls(
            unet=UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(False, True, True, False),
                            num_heads=None, head_dim=64, transformer_depth=(1, 4, 4, 1), mid_transformer_depth=4,
                            context_dim=1280,
                            use_linear_projection=True, pooled_dim=1280, micro_conditions=5),
            vae=VAEConfig(scaling_factor=0.13025), text=_openclip_bigg_text(), schedule=_sdxl_schedule(),
            family="sdxl_refiner", sample_size=1024)

    @classmethod
    def tiny(cls, family: str = "sd1") -> "ModelConfig":
        """A few million parameters: a forward pass well under a second on a CPU. For tests."""
        vae = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
        if family in ("sdxl", "sdxl_refiner"):
            # SDXL's shape in miniature: no attention at the top, deeper below, two encoders of other widths.
            # Heads 64 wide, 32 groups, 256 features per micro-condition, as single-file detection assumes
            clip_l = CLIPTextConfig(width=64, num_layers=3, num_heads=1, ffn_dim=128, projection_dim=64)
            big_g = CLIPTextConfig(width=128, num_layers=3, num_heads=2, ffn_dim=256, activation="gelu",
                                   projection_dim=96, pad_token_id=0, with_projection=True)
            texts = (clip_l, big_g) if family == "sdxl" else (big_g,)
            unet = UNetConfig(model_channels=32, channel_mult=(1, 4), attention_levels=(False, True), num_heads=None,
                              head_dim=64, transformer_depth=(1, 2), context_dim=sum(t.width for t in texts),
                              use_linear_projection=True, pooled_dim=96,
                              micro_conditions=6 if family == "sdxl" else 5, micro_condition_dim=256)
            vae = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, scaling_factor=0.13025)
            return cls(unet=unet, vae=vae, text=texts[0], text_2=texts[1] if family == "sdxl" else None,
                       schedule=_sdxl_schedule(), family=family, sample_size=64)
        if family == "sd2":
            unet = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, True),
                              num_heads=None, head_dim=8, context_dim=64, use_linear_projection=True,
                              norm_groups=8)
            text = CLIPTextConfig(width=64, num_layers=3, num_heads=4, ffn_dim=128, activation="gelu",
                                  projection_dim=64, pad_token_id=0)
        else:
            unet = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, True),
                              num_heads=2, context_dim=64, norm_groups=8)
            text = CLIPTextConfig(width=64, num_layers=3, num_heads=4, ffn_dim=128, projection_dim=64)
        return cls(unet=unet, vae=vae, text=text, family=family, sample_size=64)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        def tuples(d: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        return cls(
            unet=UNetConfig(**tuples(data["unet"])),
            vae=VAEConfig(**tuples(data["vae"])),
            text=CLIPTextConfig(**data["text"]),
            schedule=ScheduleConfig(**data["schedule"]),
            text_2=CLIPTextConfig(**data["text_2"]) if data.get("text_2") else None,
            **{k: v for k, v in data.items() if k not in ("unet", "vae", "text", "schedule", "text_2")},
        )


def _openclip_bigg_text() -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14's text tower as SDXL ships it (text_encoder_2), padded with "!" (id 0)."""
    return CLIPTextConfig(width=1280, num_layers=32, num_heads=20, ffn_dim=5120, activation="gelu",
                          projection_dim=1280, pad_token_id=0, with_projection=True)


def _sdxl_schedule() -> ScheduleConfig:
    """SDXL's scheduler_config.json: SD's betas, Euler with leading spacing and steps_offset 1."""
    return ScheduleConfig(timestep_spacing=TimestepSpacing.LEADING, steps_offset=1)


def _openclip_h_text(num_layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(width=1024, num_layers=num_layers, num_heads=16, ffn_dim=4096, activation="gelu",
                          projection_dim=1024, pad_token_id=0)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


# --- flow-matching families (SD 3.5, FLUX.1): additive, used by diffusion/flow.py and models/{t5,mmdit,flux}.py

@dataclass(frozen=True)
class FlowScheduleConfig:
    """Rectified-flow sampling schedule: x_t = (1 - t) x0 + t eps, t in [0, 1], the network predicts v = eps - x0.

    ``shift`` bends the schedule towards t = 1 (SD 3: t' = s t / (1 + (s - 1) t), s = 3). With
    ``dynamic_shift`` (FLUX.1-dev) the shift is exp(mu), mu linear in the image token count from
    ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``.
    ``spacing``: "training" spaces the steps linearly between the shifted training schedule's end points and
    shifts again (what diffusers' SD 3 pipelines do); "uniform" spaces t = 1 ... 1/steps (diffusers' FLUX.1)."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    spacing: str = "training"

    def __post_init__(self) -> None:
        _check_positive("FlowScheduleConfig", num_train_timesteps=self.num_train_timesteps)
        if not self.shift > 0:
            raise ValueError(f"FlowScheduleConfig.shift must be positive (1.0 = no shift); got {self.shift}")
        if not 0 < self.base_image_seq_len < self.max_image_seq_len:
            raise ValueError("FlowScheduleConfig: need 0 < base_image_seq_len < max_image_seq_len; got "
                             f"{self.base_image_seq_len}, {self.max_image_seq_len}")
        if self.spacing not in ("training", "uniform"):
            raise ValueError(f"FlowScheduleConfig.spacing must be 'training' or 'uniform'; got {self.spacing!r}")

    @classmethod
    def sd3(cls) -> "FlowScheduleConfig":
        return cls(shift=3.0)

    @classmethod
    def flux_dev(cls) -> "FlowScheduleConfig":
        return cls(shift=1.0, dynamic_shift=True, spacing="uniform")

    @classmethod
    def flux_schnell(cls) -> "FlowScheduleConfig":
        return cls(shift=1.0, spacing="uniform")


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (the text encoder of SD 3.5 and FLUX.1): RMSNorm, gated-GELU feed-forward, relative
    position buckets added to the attention logits of every layer (one table, learnt in the first layer)."""

    vocab_size: int = 32128
    width: int = 4096  # d_model
    num_layers: int = 24
    num_heads: int = 64
    head_dim: int = 64  # d_kv: heads * head_dim need not equal width
    ffn_dim: int = 10240
    num_buckets: int = 32
    max_distance: int = 128
    norm_eps: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        _check_positive("T5Config", vocab_size=self.vocab_size, width=self.width, num_layers=self.num_layers,
                        num_heads=self.num_heads, head_dim=self.head_dim, ffn_dim=self.ffn_dim,
                        num_buckets=self.num_buckets, max_distance=self.max_distance)
        if self.num_buckets % 4:
            raise ValueError(f"T5Config.num_buckets must be a multiple of 4 (half per direction, half of those "
                             f"exact); got {self.num_buckets}")

    @classmethod
    def xxl(cls) -> "T5Config":
        """google/t5-v1_1-xxl's encoder, as SD 3.5 and FLUX.1 ship it (text_encoder_3 / text_encoder_2)."""
        return cls()


@dataclass(frozen=True)
class MMDiTConfig:
    """SD 3 / 3.5's multimodal diffusion transformer (Esser et al. 2024): 2x2 patches of 16-channel latents,
    joint attention of text and image streams with separate weights, adaLN-Zero modulation.

    ``dual_attention_blocks``: blocks (SD 3.5 Medium: the first 13) whose image stream has a second
    self-attention (MMDiT-X). ``qk_norm``: RMSNorm of queries and keys per head (SD 3.5) or none (SD 3)."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    context_dim: int = 4096  # joint_attention_dim: T5-XXL width; CLIP states are zero-padded to it
    pooled_dim: int = 2048  # pooled CLIP-L (768) + CLIP-G (1280)
    sample_size: int = 128  # latent size the sincos grid was scaled for (base of the position grid)
    pos_embed_max_size: int = 192  # the stored position grid; smaller images use its centre crop
    dual_attention_blocks: tuple[int, ...] = ()
    qk_norm: bool = False

    def __post_init__(self) -> None:
        _check_positive("MMDiTConfig", in_channels=self.in_channels, out_channels=self.out_channels,
                        patch_size=self.patch_size, num_layers=self.num_layers, num_heads=self.num_heads,
                        head_dim=self.head_dim, context_dim=self.context_dim, pooled_dim=self.pooled_dim,
                        sample_size=self.sample_size, pos_embed_max_size=self.pos_embed_max_size)
        object.__setattr__(self, "dual_attention_blocks", tuple(sorted(self.dual_attention_blocks)))
        if any(not 0 <= i < self.num_layers for i in self.dual_attention_blocks):
            raise ValueError(f"MMDiTConfig.dual_attention_blocks must index blocks 0..{self.num_layers - 1}; "
                             f"got {self.dual_attention_blocks}")
        if self.width % 4:
            raise ValueError(f"MMDiTConfig: width {self.width} must be a multiple of 4 for 2-D sincos positions")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def sd35_large(cls) -> "MMDiTConfig":
        """stabilityai/stable-diffusion-3.5-large transformer/config.json (also Large Turbo)."""
        return cls(num_layers=38, num_heads=38, pos_embed_max_size=192, qk_norm=True)

    @classmethod
    def sd35_medium(cls) -> "MMDiTConfig":
        """stabilityai/stable-diffusion-3.5-medium transformer/config.json: MMDiT-X."""
        return cls(num_layers=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                   dual_attention_blocks=tuple(range(13)))


@dataclass(frozen=True)
class FluxConfig:
    """FLUX.1's transformer (Black Forest Labs 2024): MMDiT-style double-stream blocks, then single-stream
    blocks over the concatenated tokens (attention and MLP in parallel), rotary positions over
    (text, row, column) ids. ``guidance_embeds``: FLUX.1-dev embeds the guidance scale (distilled CFG)."""

    latent_channels: int = 16
    patch_size: int = 2  # latents are packed into 2x2 patches: 64 features per token
    num_double_blocks: int = 19
    num_single_blocks: int = 38
    num_heads: int = 24
    head_dim: int = 128
    context_dim: int = 4096  # T5-XXL
    pooled_dim: int = 768  # pooled CLIP-L
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # head channels rotated by (text index, row, column)
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    # latent-size channels concatenated to the latents before packing. FLUX.1 Fill: 80 = the 16-channel latents
    # of the image with the masked part greyed out + the pixel mask unshuffled 8x8 (64); 0 for text-to-image
    condition_channels: int = 0

    def __post_init__(self) -> None:
        if self.condition_channels < 0:
            raise ValueError(f"FluxConfig.condition_channels must be >= 0; got {self.condition_channels}")
        _check_positive("FluxConfig", latent_channels=self.latent_channels, patch_size=self.patch_size,
                        num_double_blocks=self.num_double_blocks, num_heads=self.num_heads,
                        head_dim=self.head_dim, context_dim=self.context_dim, pooled_dim=self.pooled_dim)
        if self.num_single_blocks < 0:
            raise ValueError(f"FluxConfig.num_single_blocks must be >= 0; got {self.num_single_blocks}")
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"FluxConfig.axes_dims_rope {self.axes_dims_rope} must be even numbers summing to "
                             f"head_dim={self.head_dim}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def flux_dev(cls) -> "FluxConfig":
        """black-forest-labs/FLUX.1-dev transformer/config.json."""
        return cls(guidance_embeds=True)

    @classmethod
    def flux_schnell(cls) -> "FluxConfig":
        """black-forest-labs/FLUX.1-schnell transformer/config.json: no guidance embedding."""
        return cls(guidance_embeds=False)

    @classmethod
    def flux_fill(cls) -> "FluxConfig":
        """black-forest-labs/FLUX.1-Fill-dev transformer/config.json: dev, with the masked image and the mask as
        input (in_channels 384 = 64 + 320 per token, out_channels 64)."""
        return cls(guidance_embeds=True, condition_channels=16 + 64)
