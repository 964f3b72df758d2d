"""torchsd's MMDiT equals diffusers' SD3Transformer2DModel on the same random weights."""

import dataclasses

import pytest
import torch

from reference import _perturb, max_rel_error
from torchsd.checkpoints.mmdit import config_to_diffusers, from_diffusers, to_diffusers
from torchsd.config import MMDiTConfig
from torchsd.models.mmdit import MMDiT

TINY = MMDiTConfig(in_channels=4, out_channels=4, num_layers=3, num_heads=2, head_dim=8, context_dim=24,
                   pooled_dim=12, sample_size=16, pos_embed_max_size=12)
CONFIGS = {"sd3": TINY, "sd35_large": dataclasses.replace(TINY, qk_norm=True),
           "sd35_medium": dataclasses.replace(TINY, qk_norm=True, dual_attention_blocks=(0, 1))}


def diffusers_mmdit(config: MMDiTConfig, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config_to_diffusers(config)).eval()
    _perturb(model, seed, scale=0.05)  # adaLN-Zero and output layers are not zero here
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name):
    config = CONFIGS[name]
    reference = diffusers_mmdit(config)
    ours = MMDiT(config).eval()
    ours.load_state_dict(from_diffusers(reference.state_dict(), config), strict=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 12, generator=gen)  # 4x6 patches: a non-square crop of the position grid
    context = torch.randn(2, 7, config.context_dim, generator=gen)
    pooled = torch.randn(2, config.pooled_dim, generator=gen)
    t = torch.tensor([999.0, 120.5])
    with torch.no_grad():
        theirs = reference(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        mine = ours(x, t, context, pooled)
    assert mine.shape == x.shape
    assert max_rel_error(mine, theirs) < 1e-5


def test_fresh_position_grid_equals_diffusers():
    from diffusers import SD3Transformer2DModel

    fresh = SD3Transformer2DModel(**config_to_diffusers(TINY))
    torch.testing.assert_close(MMDiT(TINY).patch_embed.pos_embed, fresh.pos_embed.pos_embed)


def test_key_map_round_trips_and_names_what_differs():
    config = CONFIGS["sd35_medium"]
    reference = diffusers_mmdit(config).state_dict()
    ours = from_diffusers(reference, config)
    assert to_diffusers(ours, config).keys() == reference.keys()
    assert "blocks.0.image.attn2.norm_q.weight" in ours and "blocks.2.text.attn.out.weight" not in ours
    with pytest.raises(ValueError, match="attn2"):
        from_diffusers(reference, CONFIGS["sd35_large"])  # Medium's dual attention in a Large-shaped config
    bad = dict(reference)
    bad["proj_out.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="proj_out.weight"):
        from_diffusers(bad, config)


def test_too_large_latent_says_what_limits_it():
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        MMDiT(TINY)(torch.zeros(1, 4, 26, 8), torch.zeros(1), torch.zeros(1, 2, 24), torch.zeros(1, 12))


@pytest.mark.parametrize("preset", ["sd35_medium", "sd35_large"])
def test_preset_parameter_count_equals_diffusers_from_the_published_config(preset):
    from diffusers import SD3Transformer2DModel

    published = {  # transformer/config.json of the stabilityai repositories
        "sd35_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        "sd35_large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                           num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                           pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                           qk_norm="rms_norm"),
    }[preset]
    config = getattr(MMDiTConfig, preset)()
    assert config_to_diffusers(config) == {"dual_attention_layers": (), **published}
    with torch.device("meta"):
        ours, theirs = MMDiT(config), SD3Transformer2DModel(**published)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    expected_buffers = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in to_diffusers(ours.state_dict(), config).items()} == expected_buffers


def test_euler_run_equals_stable_diffusion3_pipeline():
    """transformer + flow denoiser + Euler, with CFG, against StableDiffusion3Pipeline given the same starting
    latents and prompt embeddings (no text encoders, latents out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from torchsd.config import FlowScheduleConfig
    from torchsd.diffusion.flow import FlowDenoiser, flow_guidance, flow_sigmas
    from torchsd.diffusion.samplers_karras import sample_euler

    config = CONFIGS["sd35_medium"]
    reference = diffusers_mmdit(config)
    ours = MMDiT(config).eval()
    ours.load_state_dict(from_diffusers(reference.state_dict(), config), strict=True)
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    cond = (torch.randn(1, 5, config.context_dim, generator=gen), torch.randn(1, config.pooled_dim, generator=gen))
    uncond = (torch.randn(1, 5, config.context_dim, generator=gen), torch.randn(1, config.pooled_dim, generator=gen))
    schedule, steps, scale = FlowScheduleConfig.sd3(), 6, 4.5

    pipe = StableDiffusion3Pipeline(transformer=reference, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond[0], pooled_prompt_embeds=cond[1], negative_prompt_embeds=uncond[0],
                      negative_pooled_prompt_embeds=uncond[1], latents=latents.clone(), height=64, width=64,
                      num_inference_steps=steps, guidance_scale=scale, output_type="latent").images

    sigmas = flow_sigmas(schedule, steps)
    mine = sample_euler(flow_guidance(FlowDenoiser(ours, schedule), cond, uncond, scale),
                        latents * sigmas[0].item(), sigmas)
    assert max_rel_error(theirs, latents) > 0.1  # the run went somewhere
    assert max_rel_error(mine, theirs) < 1e-4


def test_bfloat16_runs_close_to_float32():
    import copy

    model = MMDiT(CONFIGS["sd35_medium"]).eval()
    _perturb(model, 0, scale=0.05)
    gen = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 24, generator=gen), \
        torch.randn(1, 12, generator=gen)
    t = torch.tensor([500.0])
    with torch.no_grad():
        full = model(x, t, context, pooled)
        half = copy.deepcopy(model).bfloat16()(x.bfloat16(), t, context.bfloat16(), pooled.bfloat16())
    assert half.dtype == torch.bfloat16 and max_rel_error(half, full) < 3e-2
