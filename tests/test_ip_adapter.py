"""IP-Adapter: the same random weights, written in the published file layout, give the same U-Net output in
torchsd and in diffusers (``unet._load_ip_adapter_weights``), for the basic and the "Plus" adapter."""

import pytest
import torch
from safetensors.torch import save_file

from reference import diffusers_unet, max_rel_error, random_pipeline
from torchsd.checkpoints.io import CheckpointError
from torchsd.checkpoints.ip_adapter import load_ip_adapter
from torchsd.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attention_widths

TOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request):
    return random_pipeline(request.param)


def random_ip_adapter(sd, plus: bool, seed: int = 0, image_dim: int = 48) -> IPAdapter:
    context = sd.config.unet.context_dim
    config = IPAdapterConfig(image_dim=image_dim, context_dim=context, tokens=4, plus=True, hidden_dim=64, depth=4,
                             head_dim=64, heads=2, ffn_mult=4) if plus else \
        IPAdapterConfig(image_dim=image_dim, context_dim=context, tokens=4)
    torch.manual_seed(seed)
    adapter = IPAdapter(config, cross_attention_widths(sd.unet))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return adapter.eval()


def original_state(adapter: IPAdapter, sd, unet_reference) -> dict:
    """The published layout, numbered by diffusers' own processor order (an independent writer)."""
    ours = [n for n, m in sd.unet.named_modules() if hasattr(m, "attn2")]
    theirs = [k.removesuffix(".attn2.processor") for k in unet_reference.attn_processors
              if k.endswith("attn2.processor")]
    layers = {}
    for k, name in enumerate(theirs):
        layer = adapter.layers[ours.index(name)]
        layers[f"{2 * k + 1}.to_k_ip.weight"] = layer.to_k_ip.weight.detach().clone()
        layers[f"{2 * k + 1}.to_v_ip.weight"] = layer.to_v_ip.weight.detach().clone()
    image_proj = {k: v.detach().clone() for k, v in adapter.image_proj.state_dict().items()}
    return {"image_proj": image_proj, "ip_adapter": layers}


@pytest.mark.parametrize("plus", [False, True], ids=["basic", "plus"])
@pytest.mark.parametrize("form", ["bin", "safetensors"])
def test_unet_with_ip_adapter_matches_diffusers(sd, tmp_path, plus, form):
    adapter = random_ip_adapter(sd, plus)
    unet_ref = diffusers_unet(sd)
    state = original_state(adapter, sd, unet_ref)
    path = tmp_path / f"ip-adapter.{form}"
    if form == "bin":
        torch.save(state, path)
    else:
        save_file({f"{part}.{k}": v.contiguous() for part in state for k, v in state[part].items()}, str(path))
    loaded = load_ip_adapter(path, sd.unet)
    assert loaded.config == adapter.config
    unet_ref._load_ip_adapter_weights([state])
    scale = 0.6
    for processor in unet_ref.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    image = torch.randn(2, 5, 48, generator=gen) if plus else torch.randn(2, 48, generator=gen)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        tokens = loaded.image_tokens(image)
        ours = sd.unet(x, t, context, image_keys_values=loaded.keys_values(tokens, scale))
        theirs = unet_ref(x, t, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": [image[:, None]]}
                          ).sample
        assert max_rel_error(ours, theirs) < TOL
        assert max_rel_error(ours, sd.unet(x, t, context)) > 1e-3


def test_faceid_and_wrong_family_are_refused(sd, tmp_path):
    torch.save({"image_proj": {"proj.0.weight": torch.zeros(1), "proj.3.weight": torch.zeros(1)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}}, tmp_path / "full-face.bin")
    with pytest.raises(CheckpointError, match="FaceID or full-face"):
        load_ip_adapter(tmp_path / "full-face.bin", sd.unet)
    adapter = random_ip_adapter(sd, False)
    state = {"image_proj": adapter.image_proj.state_dict(),
             "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4), "1.to_v_ip.weight": torch.zeros(4, 4)}}
    torch.save(state, tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match="another model family"):
        load_ip_adapter(tmp_path / "other.bin", sd.unet)


# --- the image encoder and the run ------------------------------------------------------------------------------

def tiny_encoder_folder(path, projection_dim: int = 48):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=projection_dim, hidden_act="gelu")).eval()
    model.save_pretrained(path)
    return model


def test_image_encoder_matches_transformers(tmp_path):
    from torchsd.checkpoints.ip_adapter import load_image_encoder

    ref = tiny_encoder_folder(tmp_path / "image_encoder")
    ours = load_image_encoder(tmp_path / "image_encoder")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ref(pixels, output_hidden_states=True)
        assert max_rel_error(ours.features(pixels, plus=False), out.image_embeds) < TOL
        assert max_rel_error(ours.features(pixels, plus=True), out.hidden_states[-2]) < TOL


def test_run_matches_diffusers_pipeline_with_image_embeds(tmp_path):
    import numpy as np
    from PIL import Image

    import torchsd
    from test_pipeline_parity import diffusers_pipeline, initial_latents
    from torchsd.checkpoints.ip_adapter import load_image_encoder
    from torchsd.images import pil_to_tensor
    from torchsd.models.clip import preprocess_images

    sd = random_pipeline("sd1")
    sd.save(tmp_path / "model")
    adapter = random_ip_adapter(sd, plus=False)
    pipe = diffusers_pipeline(tmp_path / "model")
    state = original_state(adapter, sd, pipe.unet)
    (tmp_path / "ip").mkdir()
    torch.save(state, tmp_path / "ip" / "ip-adapter_tiny.bin")
    tiny_encoder_folder(tmp_path / "ip" / "image_encoder")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))

    ours = torchsd.load_pipeline(tmp_path / "model", dtype=torch.float32).generate(
        "a red circle", "blurry", steps=8, guidance_scale=6.0, sampler="ddim", eta=0.0, width=32, height=32,
        latents=initial_latents(), seed=0, ip_adapter_image=image,
        ip_adapter_model=tmp_path / "ip" / "ip-adapter_tiny.bin", ip_adapter_scale=0.6)
    encoder = load_image_encoder(tmp_path / "ip" / "image_encoder")
    with torch.no_grad():
        embeds = encoder.features(preprocess_images(pil_to_tensor(image), 32), plus=False)
    pipe.unet._load_ip_adapter_weights([state])
    pipe.set_ip_adapter_scale(0.6)
    theirs = pipe("a red circle", negative_prompt="blurry", num_inference_steps=8, guidance_scale=6.0, width=32,
                  height=32, latents=initial_latents(), output_type="latent",
                  ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])[:, None]]).images
    assert max_rel_error(ours.latents, theirs) < TOL
    assert "IP-Adapter: ip-adapter_tiny, IP-Adapter scale: 0.6" in ours.infotexts[0]


def test_ip_adapter_beside_controlnet_and_from_the_cli(tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    import torchsd
    from test_controlnet import random_controlnet
    from torchsd.checkpoints.diffusers import to_diffusers_keys
    from torchsd.cli import main
    from torchsd.pipeline.infotext import read_png_infotext

    sd = random_pipeline("sd1")
    sd.save(tmp_path / "model")
    (tmp_path / "ip").mkdir()
    torch.save(original_state(random_ip_adapter(sd, plus=True, image_dim=32), sd, diffusers_unet(sd)),
               tmp_path / "ip" / "ip-adapter-plus_tiny.bin")
    tiny_encoder_folder(tmp_path / "ip" / "image_encoder")
    net = random_controlnet(sd, 3, hint_widths=(16, 32))
    save_file({k: v.contiguous() for k, v in to_diffusers_keys(net.state_dict(), "unet").items()},
              str(tmp_path / "cn.safetensors"))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    local = torchsd.load_pipeline(tmp_path / "model", dtype=torch.float32)
    unit = torchsd.ControlUnit(image=image, model=tmp_path / "cn.safetensors", control_mode="control")
    base = dict(steps=3, width=32, height=32, seed=3)
    both = local.generate("a cat", control=[unit], ip_adapter_image=image,
                          ip_adapter_model=tmp_path / "ip" / "ip-adapter-plus_tiny.bin", **base)
    control_only = local.generate("a cat", control=[unit], **base)
    assert max_rel_error(both.latents, control_only.latents) > 1e-3
    image.save(tmp_path / "ref.png")
    assert main(["generate", "a cat", "--model", str(tmp_path / "model"), "--device", "cpu", "--steps", "3",
                 "--size", "32x32", "--ip-adapter-image", str(tmp_path / "ref.png"), "--ip-adapter-model",
                 str(tmp_path / "ip" / "ip-adapter-plus_tiny.bin"), "--ip-adapter-scale", "0.5",
                 "--output", str(tmp_path / "out.png")]) == 0
    assert "IP-Adapter: ip-adapter-plus_tiny, IP-Adapter scale: 0.5" in read_png_infotext(tmp_path / "out.png")
