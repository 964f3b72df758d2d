"""ESRGAN-family upscalers: torchsd's RRDBNet and SRVGGNetCompact give spandrel's outputs (the reference; a
test-only dependency) on random weights in the old ESRGAN, BasicSR (``params_ema``) and Real-ESRGAN Compact
layouts; large images go tile by tile; names resolve from the upscaler folder for hires fix, the CLI and the
server's Extras endpoints, called with the real webuiapi client."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from reference import random_pipeline
from serverutil import KEY, one_thread, tiny_compact_upscaler
from torchsd import load_pipeline
from torchsd.checkpoints.io import CheckpointError
from torchsd.checkpoints.upscalers import UpscalerLibrary, load_upscaler
from torchsd.models.upscalers import upscale_pixels


def _spandrel():
    """spandrel, imported without torchvision: it declares torchvision (CUDA-sized wheels) but only two
    architectures we do not test import it, so a stand-in module lets the package import on a CPU-torch
    install. Installed with ``pip install --no-deps spandrel``."""
    if importlib.util.find_spec("spandrel") is None:
        pytest.skip("spandrel is not installed (pip install --no-deps spandrel)")
    if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import spandrel

        return spandrel
    stub = types.ModuleType("torchvision")
    stub.transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = functional.rotate = functional.normalize = None
    stub.transforms.functional = functional
    names = {"torchvision": stub, "torchvision.transforms": stub.transforms,
             "torchvision.transforms.functional": functional}
    sys.modules.update(names)
    try:
        import spandrel
    finally:  # gone again, so that no other library believes torchvision is installed
        for name in names:
            sys.modules.pop(name, None)
    return spandrel


def perturbed(model: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return {k: v.clone() for k, v in model.state_dict().items()}


def basicsr_rrdb(seed: int, features=8, growth=32, blocks=2, upsamplings=2, in_channels=3) -> dict:
    """Random weights under BasicSR's RRDBNet names (conv_first, body.N.rdbK.convJ, conv_body, conv_upK, conv_hr,
    conv_last), written from the layout itself."""
    gen = torch.Generator().manual_seed(seed)

    def conv(cin, cout):
        weight = torch.randn(cout, cin, 3, 3, generator=gen) * (1 / (cin * 9)) ** 0.5
        return weight, torch.randn(cout, generator=gen) * 0.01

    state = {}
    shapes = {"conv_first": (in_channels, features), "conv_body": (features, features),
              "conv_hr": (features, features), "conv_last": (features, 3)}
    shapes.update({f"conv_up{k + 1}": (features, features) for k in range(upsamplings)})
    for b in range(blocks):
        for r in (1, 2, 3):
            for j in range(1, 6):
                shapes[f"body.{b}.rdb{r}.conv{j}"] = (features + (j - 1) * growth, features if j == 5 else growth)
    for name, (cin, cout) in shapes.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = conv(cin, cout)
    return state


def same_as_spandrel(path, state, size=(1, 3, 24, 20)):
    spandrel = _spandrel()
    reference = spandrel.ModelLoader().load_from_state_dict(state).model.eval()
    ours = load_upscaler(path)
    x = torch.rand(*size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = reference(x), ours(x)
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    return ours


def test_old_esrgan_layout_matches_spandrel(tmp_path):
    spandrel = _spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=2, scale=4)
    state = perturbed(model, 1)
    assert "model.0.weight" in state and "model.1.sub.0.RDB1.conv1.0.weight" in state  # the old layout
    torch.save(state, tmp_path / "4x_old.pth")
    ours = same_as_spandrel(tmp_path / "4x_old.pth", state)
    assert ours.config.scale == 4 and spandrel is not None


@pytest.mark.parametrize("upsamplings, in_channels, scale", [(2, 3, 4), (3, 3, 8), (2, 12, 2)],
                         ids=["x4", "x8", "x2-unshuffle"])
def test_basicsr_layout_in_params_ema_matches_spandrel(tmp_path, upsamplings, in_channels, scale):
    state = basicsr_rrdb(2, upsamplings=upsamplings, in_channels=in_channels)
    torch.save({"params_ema": state, "params": {k: v * 0 for k, v in state.items()}}, tmp_path / "x.pth")
    ours = same_as_spandrel(tmp_path / "x.pth", state)
    assert ours.config.scale == scale


def test_compact_matches_spandrel_and_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = tiny_compact_upscaler(seed=3, convs=3)
    save_file(state, str(tmp_path / "realesr-general-x4v3.safetensors"))
    ours = same_as_spandrel(tmp_path / "realesr-general-x4v3.safetensors", state)
    assert ours.config.scale == 4 and ours.config.convs == 3


def test_large_images_go_tile_by_tile_close_to_whole():
    state = tiny_compact_upscaler(seed=4, convs=1)
    from torchsd.checkpoints.upscalers import _compact

    model = _compact(state)
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    whole = upscale_pixels(model, x, tile=1000)
    tiled = upscale_pixels(model, x, tile=24, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 160, 224)
    assert (tiled - whole).abs().mean() < 0.01 and (tiled - whole).abs().max() < 0.2


def test_unknown_files_and_names_are_refused(tmp_path):
    # SwinIR's layout (A1111's SwinIR_4x), named as such rather than as an unknown file
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(180, 3, 3, 3),
                               "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": torch.zeros(2)}},
               tmp_path / "SwinIR_4x.pth")
    with pytest.raises(CheckpointError, match="SwinIR_4x.pth: a SwinIR file: torchsd reads the ESRGAN family only"):
        load_upscaler(tmp_path / "SwinIR_4x.pth")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not an upscaler torchsd reads"):
        load_upscaler(tmp_path / "odd.pth")
    state = basicsr_rrdb(0)
    del state["conv_hr.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing \['conv_hr.bias'\]"):
        load_upscaler(tmp_path / "broken.pth")
    library = UpscalerLibrary()
    library.add_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown upscaler 'nope'.*broken, odd"):
        library.load("nope")


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ESRGAN")
    torch.save({"params_ema": tiny_compact_upscaler(seed=0)}, folder / "R-ESRGAN 4x+.pth")
    return folder


def test_hires_fix_through_a_network_and_the_cli_flag(upscaler_dir, tmp_path):
    from torchsd.cli import main

    sd = random_pipeline("sd1", seed=2)
    options = dict(seed=3, width=32, height=32, steps=2, sampler="ddim", hires=True, hires_steps=1)
    with pytest.raises(ValueError, match="unknown hires upscaler 'R-ESRGAN 4x\\+'.*--upscalers-dir"):
        sd.generate("a cat", hires_upscaler="R-ESRGAN 4x+", **options)
    sd.upscalers.add_dir(upscaler_dir)
    network = sd.generate("a cat", hires_upscaler="r-esrgan 4x+", **options)
    lanczos = sd.generate("a cat", hires_upscaler="Lanczos", **options)
    assert network.images[0].size == (64, 64)
    assert not torch.equal(network.latents, lanczos.latents)
    assert "Hires upscaler: R-ESRGAN 4x+" in network.infotexts[0]
    sd.save(tmp_path / "model")
    code = main(["generate", "a cat", "--model", str(tmp_path / "model"), "--steps", "2", "--size", "32x32",
                 "--hires", "--hires-upscaler", "R-ESRGAN 4x+", "--upscalers-dir", str(upscaler_dir),
                 "--output", str(tmp_path / "out.png")])
    assert code == 0 and Image.open(tmp_path / "out.png").size == (64, 64)


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=3, username="user",
                             password=KEY)


def test_webuiapi_extra_single_image_runs_the_network(api, models_dir):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    result = api.extra_single_image(image=image, upscaler_1="R-ESRGAN 4x+", upscaling_resize=4)
    assert result.image.size == (80, 96)
    library = UpscalerLibrary()
    library.add_dir(models_dir / "ESRGAN")
    from torchsd.images import pil_to_tensor, tensor_to_pil

    with one_thread():
        network = library.load("R-ESRGAN 4x+")
        expected = tensor_to_pil(upscale_pixels(network, (pil_to_tensor(image) + 1) / 2) * 2 - 1)
    assert np.abs(np.asarray(result.image.convert("RGB"), np.int16) - np.asarray(expected[0], np.int16)).max() <= 1
    # to a box, cropped to fill it, and a batch
    boxed = api.extra_single_image(image=image, upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=40,
                                   upscaling_resize_h=30)
    assert boxed.image.size == (40, 30)
    batch = api.extra_batch_images(images=[image, image], upscaler_1="Nearest", upscaling_resize=2)
    assert [im.size for im in batch.images] == [(40, 48), (40, 48)]


def test_webuiapi_extras_refuses_unknown_upscalers_and_face_restoration(api):
    image = Image.new("RGB", (16, 16))
    with pytest.raises(RuntimeError, match="unknown upscaler .+4x-UltraSharp.+one of None, Lanczos, Nearest, R-ESRGAN"):
        api.extra_single_image(image=image, upscaler_1="4x-UltraSharp")
    with pytest.raises(RuntimeError, match="face restoration is not supported"):
        api.extra_single_image(image=image, gfpgan_visibility=0.5)


def test_webuiapi_txt2img_hires_with_the_network(api, models_dir):
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=11, enable_hr=True, hr_scale=2,
                         hr_upscaler="R-ESRGAN 4x+", hr_second_pass_steps=1, denoising_strength=0.5)
    assert result.image.size == (128, 128)
    assert "Hires upscaler: R-ESRGAN 4x+" in result.info["infotexts"][0]
    local = load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)
    local.upscalers.add_dir(models_dir / "ESRGAN")
    with one_thread():
        expected = local.generate("a cat", width=64, height=64, steps=3, sampler="ddim", eta=1.0, seed=11,
                                  guidance_scale=7.0, hires=True, hires_scale=2, hires_upscaler="R-ESRGAN 4x+",
                                  hires_steps=1, hires_strength=0.5)
    assert np.abs(np.asarray(result.image, np.int16) - np.asarray(expected.images[0], np.int16)).max() <= 1


def test_img2img_resizes_the_init_image_with_the_network(upscaler_dir):
    from torchsd.pipeline.upscaling import resize

    sd = random_pipeline("sd1", seed=2)
    sd.upscalers.add_dir(upscaler_dir)
    small = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    options = dict(seed=3, width=64, height=64, steps=2, sampler="ddim", strength=0.5)
    network = sd.generate("a cat", init_image=small, img2img_upscaler="R-ESRGAN 4x+", **options)
    by_hand = sd.generate("a cat", init_image=resize(small, 64, 64, "R-ESRGAN 4x+", sd.upscalers), **options)
    lanczos = sd.generate("a cat", init_image=small, **options)
    assert torch.equal(network.latents, by_hand.latents)
    assert not torch.equal(network.latents, lanczos.latents)
    with pytest.raises(ValueError, match="unknown upscaler 'nope'"):
        sd.generate("a cat", init_image=small, img2img_upscaler="nope", **options)


def test_webuiapi_img2img_with_upscaler_for_img2img(api, models_dir):
    small = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    result = api.img2img(images=[small], prompt="a cat", width=64, height=64, seed=5, denoising_strength=0.5,
                         override_settings={"upscaler_for_img2img": "R-ESRGAN 4x+"})
    local = load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)
    local.upscalers.add_dir(models_dir / "ESRGAN")
    with one_thread():
        expected = local.generate("a cat", init_image=small, img2img_upscaler="R-ESRGAN 4x+", width=64, height=64,
                                  steps=3, sampler="ddim", eta=1.0, seed=5, guidance_scale=7.0, strength=0.5)
    assert np.abs(np.asarray(result.image, np.int16) - np.asarray(expected.images[0], np.int16)).max() <= 1
