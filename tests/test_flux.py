"""torchsd's FLUX.1 transformer equals diffusers' FluxTransformer2DModel on the same random weights."""

import dataclasses

import pytest
import torch

from reference import _perturb, max_rel_error
from torchsd.checkpoints.flux import config_to_diffusers, from_diffusers, to_diffusers
from torchsd.config import FluxConfig
from torchsd.models.flux import Flux, image_ids, pack

TINY = FluxConfig(latent_channels=4, num_double_blocks=2, num_single_blocks=2, num_heads=2, head_dim=16,
                  context_dim=24, pooled_dim=12, axes_dims_rope=(4, 6, 6))
CONFIGS = {"dev": TINY, "schnell": dataclasses.replace(TINY, guidance_embeds=False)}


def diffusers_flux(config: FluxConfig, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config_to_diffusers(config)).eval()
    _perturb(model, seed, scale=0.05)
    return model


def run_diffusers(model, x, t, context, pooled, guidance):
    """diffusers' calling convention, as FluxPipeline makes it: packed latents, ids, t and guidance unscaled."""
    B, C, H, W = x.shape
    return model(pack(x, 2), timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                 encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3),
                 img_ids=image_ids(H // 2, W // 2, x.device)).sample


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    config = CONFIGS[name]
    reference = diffusers_flux(config)
    ours = Flux(config).eval()
    ours.load_state_dict(from_diffusers(reference.state_dict(), config), strict=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 12, generator=gen)
    context = torch.randn(2, 7, config.context_dim, generator=gen)
    pooled = torch.randn(2, config.pooled_dim, generator=gen)
    t = torch.tensor([1000.0, 120.5])
    guidance = torch.tensor([3.5, 1.0]) if config.guidance_embeds else None
    with torch.no_grad():
        theirs = run_diffusers(reference, x, t, context, pooled, guidance)
        mine = ours(x, t, context, pooled, guidance=guidance)
    assert mine.shape == x.shape
    torch.testing.assert_close(pack(mine, 2), theirs, atol=1e-5, rtol=1e-4)
    assert max_rel_error(FluxPipeline._unpack_latents(theirs, 64, 96, 8), mine) < 1e-5
    assert torch.equal(pack(x, 2), FluxPipeline._pack_latents(x, 2, 4, 8, 12))
    assert torch.equal(image_ids(4, 6, x.device), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


def test_dev_needs_guidance_and_the_message_says_so():
    model = Flux(TINY).eval()
    with pytest.raises(ValueError, match="guidance="):
        model(torch.zeros(1, 4, 4, 4), torch.zeros(1), torch.zeros(1, 2, 24), torch.zeros(1, 12))


def test_key_map_round_trips_and_names_what_differs():
    reference = diffusers_flux(TINY).state_dict()
    ours = from_diffusers(reference, TINY)
    assert to_diffusers(ours, TINY).keys() == reference.keys()
    with pytest.raises(ValueError, match="guidance_embedder"):
        from_diffusers(reference, CONFIGS["schnell"])


@pytest.mark.parametrize("preset", ["flux_dev", "flux_schnell"])
def test_preset_parameter_count_equals_diffusers_from_the_published_config(preset):
    from diffusers import FluxTransformer2DModel

    published = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=preset == "flux_dev", axes_dims_rope=(16, 56, 56))
    config = getattr(FluxConfig, preset)()
    assert config_to_diffusers(config) == published
    with torch.device("meta"):
        ours, theirs = Flux(config), FluxTransformer2DModel(**published)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert {k: tuple(v.shape) for k, v in to_diffusers(ours.state_dict(), config).items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert count == (11_901_408_320 if preset == "flux_dev" else 11_891_178_560)


def test_bad_config_says_how_to_fix_it():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig(axes_dims_rope=(16, 56, 54))


@pytest.mark.parametrize("name", CONFIGS)
def test_euler_run_equals_flux_pipeline(name):
    """transformer + flow denoiser + Euler against FluxPipeline given the same starting latents and prompt
    embeddings (no text encoders, latents out); dev with its embedded guidance and the dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from torchsd.config import FlowScheduleConfig
    from torchsd.diffusion.flow import FlowDenoiser, flow_guidance, flow_sigmas
    from torchsd.diffusion.samplers_karras import sample_euler

    config = CONFIGS[name]
    reference = diffusers_flux(config)
    ours = Flux(config).eval()
    ours.load_state_dict(from_diffusers(reference.state_dict(), config), strict=True)
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 4, 8, 12, generator=gen)
    cond = (torch.randn(1, 5, config.context_dim, generator=gen), torch.randn(1, config.pooled_dim, generator=gen))
    dev = config.guidance_embeds
    schedule = FlowScheduleConfig.flux_dev() if dev else FlowScheduleConfig.flux_schnell()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    steps, guidance = 5, 3.5

    pipe = FluxPipeline(transformer=reference, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond[0], pooled_prompt_embeds=cond[1], latents=pack(latents, 2), height=64,
                      width=96, num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images

    sigmas = flow_sigmas(schedule, steps, image_seq_len=4 * 6)  # (64 / 16) x (96 / 16) tokens
    extras = {"guidance": guidance} if dev else {}
    mine = sample_euler(flow_guidance(FlowDenoiser(ours, schedule), cond, None, 1.0, **extras),
                        latents * sigmas[0].item(), sigmas)
    assert max_rel_error(theirs, pack(latents, 2)) > 0.1  # the run went somewhere
    assert max_rel_error(pack(mine, 2), theirs) < 1e-4


def test_bfloat16_runs_close_to_float32():
    import copy

    model = Flux(TINY).eval()
    _perturb(model, 0, scale=0.05)
    gen = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 24, generator=gen), \
        torch.randn(1, 12, generator=gen)
    t = torch.tensor([500.0])
    with torch.no_grad():
        full = model(x, t, context, pooled, guidance=3.5)
        half = copy.deepcopy(model).bfloat16()(x.bfloat16(), t, context.bfloat16(), pooled.bfloat16(), guidance=3.5)
    assert half.dtype == torch.bfloat16 and max_rel_error(half, full) < 3e-2
