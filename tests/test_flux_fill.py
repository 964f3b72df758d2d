"""FLUX.1 Fill: the transformer equals diffusers' FluxTransformer2DModel with Fill's input width; a Fill folder
written by diffusers' save_pretrained loads (and a BFL single file's shapes say Fill); inpainting with it gives
the final latents of diffusers' FluxFillPipeline on the same weights, image, mask and seed, with the kept part
re-noised after each step as diffusers' FluxInpaintPipeline does (torchsd pins x0 there, as it does for every
inpainting model; for Euler the two are the same); and a Fill model asked for text to image says what it needs."""

import dataclasses

import numpy as np
import pytest
import torch

import flow_reference as ref
import torchsd
from reference import max_rel_error
from test_flow_features import SIZE, box_mask, picture
from test_flux import TINY, diffusers_flux
from torchsd.checkpoints import bfl
from torchsd.checkpoints.flux import from_diffusers
from torchsd.checkpoints.io import CheckpointError
from torchsd.config import FluxConfig
from torchsd.models.flux import Flux, image_ids, pack

FILL = dataclasses.replace(TINY, condition_channels=TINY.latent_channels + 4)  # a 2x VAE's mask: 4 channels


def test_fill_transformer_matches_diffusers_on_concatenated_tokens():
    reference = diffusers_flux(FILL)
    assert reference.config.in_channels == 4 * (4 + 8) and reference.config.out_channels == 16
    ours = Flux(FILL).eval()
    ours.load_state_dict(from_diffusers(reference.state_dict(), FILL), strict=True)
    gen = torch.Generator().manual_seed(3)
    x, condition = torch.randn(2, 4, 8, 12, generator=gen), torch.randn(1, 8, 8, 12, generator=gen)
    context, pooled = torch.randn(2, 7, FILL.context_dim, generator=gen), torch.randn(2, FILL.pooled_dim, generator=gen)
    t, guidance = torch.tensor([1000.0, 120.5]), torch.tensor([30.0, 30.0])
    with torch.no_grad():
        tokens = torch.cat([pack(x, 2), pack(condition.expand(2, -1, -1, -1), 2)], dim=2)
        theirs = reference(tokens, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                           encoder_hidden_states=context, txt_ids=torch.zeros(7, 3),
                           img_ids=image_ids(4, 6, "cpu")).sample
        mine = ours(x, t, context, pooled, guidance=guidance, condition=condition)  # one condition for the batch
    assert mine.shape == x.shape
    torch.testing.assert_close(pack(mine, 2), theirs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"needs condition=\(B, 8, 8, 12\)"):
        ours(x, t, context, pooled, guidance=guidance)
    with pytest.raises(ValueError, match="only FLUX.1 Fill"):
        Flux(TINY).eval()(x, t, context, pooled, guidance=guidance, condition=condition)


def test_the_published_fill_config_counts_as_diffusers_and_bfl_shapes_say_fill():
    from diffusers import FluxTransformer2DModel

    config = FluxConfig.flux_fill()
    with torch.device("meta"):
        ours, theirs = Flux(config), FluxTransformer2DModel(
            patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in bfl.to_bfl(ours.state_dict(), config).items()}
    assert bfl.config_of(shapes, "fill.safetensors") == config
    depth = dict(shapes, **{"img_in.weight": torch.empty(3072, 128, device="meta")})
    with pytest.raises(CheckpointError, match="Depth or Canny"):
        bfl.config_of(depth, "depth.safetensors")


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    work = tmp_path_factory.mktemp("flux_fill")
    folder = ref.saved(ref.fill_pipeline(work), work / "fill")
    return folder, torchsd.load_pipeline(folder, "cpu", torch.float32)


def reference_latents(folder, steps: int, seed: int, guidance: float) -> torch.Tensor:
    """FluxFillPipeline at strength 1, with FluxInpaintPipeline's blend of the kept part after each step."""
    from diffusers import FluxFillPipeline
    from diffusers.utils.torch_utils import randn_tensor

    pipe = FluxFillPipeline.from_pretrained(folder)
    # the draws FluxFillPipeline makes first, in its order: the image's latents, then the noise
    generator = torch.Generator().manual_seed(seed)
    image = pipe.image_processor.preprocess(picture(), **SIZE)
    image_latents = pipe._encode_vae_image(image, generator)
    noise = randn_tensor(image_latents.shape, generator=generator)
    keep = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(box_mask()) / 255.0)[None, None].float(),
                                           size=image_latents.shape[2:])  # nearest: BOX is on whole latent cells
    keep = pack((1 - keep).expand_as(image_latents), 2)

    def blend(pipe, i, t, kwargs):
        t_next = pipe.scheduler.sigmas[i + 1]
        kept = pack((1 - t_next) * image_latents + t_next * noise, 2)
        return {"latents": kept * keep + kwargs["latents"] * (1 - keep)}

    with torch.no_grad():
        latents = pipe(prompt="a red chair", image=picture(), mask_image=box_mask(), strength=1.0,
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=[torch.Generator().manual_seed(seed)], output_type="latent",
                       callback_on_step_end=blend, **SIZE).images
    return pipe._unpack_latents(latents, SIZE["height"], SIZE["width"], 2)


def test_inpainting_with_fill_equals_flux_fill_pipeline(fill):
    folder, pipe = fill
    assert pipe.config.is_inpainting and pipe.config.label == "FLUX.1 (dev, Fill)"
    expected = reference_latents(folder, steps=4, seed=5, guidance=30.0)
    result = pipe.generate("a red chair", init_image=picture(), mask=box_mask(), mask_blur=0, strength=1.0,
                           steps=4, seed=5, distilled_cfg_scale=30.0, **SIZE)
    assert max_rel_error(result.latents, expected) < 1e-4
    out, original, inside = np.asarray(result.images[0]), np.asarray(picture()), np.asarray(box_mask()) > 0
    assert np.array_equal(out[~inside], original[~inside])
    assert "Distilled CFG Scale: 30" in result.infotexts[0] and "Mask blur: 0" in result.infotexts[0]


def test_the_condition_changes_the_picture_and_text_to_image_is_refused(fill):
    """The masked image and the mask reach the transformer: another picture under the same mask changes the
    repainted part; without a mask, the message names what Fill needs."""
    _, pipe = fill
    run = dict(mask=box_mask(), mask_blur=0, strength=1.0, steps=2, seed=5, **SIZE)
    a = pipe.generate("a red chair", init_image=picture(seed=0), **run).latents
    b = pipe.generate("a red chair", init_image=picture(seed=1), **run).latents
    inside = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(box_mask()) > 0)[None, None].float(),
                                             size=a.shape[2:]).bool().expand_as(a)
    assert (a - b)[inside].abs().max() > 1e-3
    with pytest.raises(ValueError, match="Fill model repaints the masked part of an image; give init_image and mask"):
        pipe.generate("a red chair", steps=2, seed=5, **SIZE)


def test_cli_inpaint_with_fill_and_its_refusal_of_text_to_image(fill, tmp_path, capsys):
    from PIL import Image

    from torchsd.cli import main

    folder, pipe = fill
    model = ["--model", str(folder), "--dtype", "fp32", "--device", "cpu"]
    picture().save(tmp_path / "in.png")
    box_mask().save(tmp_path / "mask.png")
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "a red chair", "--steps", "3",
                 "--seed", "2", "--mask-blur", "0", "--strength", "1", "--distilled-cfg", "30",
                 "-o", str(tmp_path / "filled.png"), *model]) == 0
    expected = pipe.generate("a red chair", init_image=picture(), mask=box_mask(), mask_blur=0, strength=1.0,
                             steps=3, seed=2, distilled_cfg_scale=30.0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "filled.png")), np.asarray(expected.images[0]))
    capsys.readouterr()
    assert main(["generate", "a red chair", "--steps", "2", "--size", "32x32", "-o", str(tmp_path / "no.png"),
                 *model]) != 0
    assert "give init_image and mask" in capsys.readouterr().err and not (tmp_path / "no.png").exists()


def test_fill_defaults_to_a_distilled_cfg_of_30(fill):
    _, pipe = fill
    run = dict(init_image=picture(), mask=box_mask(), mask_blur=0, strength=1.0, steps=2, seed=5, **SIZE)
    default, thirty = pipe.generate("a red chair", **run), pipe.generate("a red chair", distilled_cfg_scale=30.0, **run)
    assert torch.equal(default.latents, thirty.latents) and "Distilled CFG Scale: 30" in default.infotexts[0]
