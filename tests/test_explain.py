"""`torchsd explain`: the hooks capture what the real run computes, with the right shapes, at no cost when off."""

import pytest
import torch
from PIL import Image, ImageDraw

from reference import random_pipeline
from torchsd import cli
from torchsd.models.layers import attention, attention_probabilities
from torchsd.models.unet import SpatialTransformer
from torchsd.pipeline import GenerationRequest

pytest.importorskip("matplotlib")  # the `explain` extra; listed in `make setup`

from torchsd.explain.trace import explain, watch_cross_attention  # noqa: E402

PROMPT = "a red circle at the top left"
SIZE = 32


def circle_image() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (40, 60, 200))
    ImageDraw.Draw(image).ellipse((3, 3, 15, 15), fill=(220, 30, 30))
    return image


@pytest.fixture(scope="module")
def sd():
    return random_pipeline()


@pytest.fixture(scope="module")
def request_():
    return GenerationRequest(PROMPT, steps=3, seed=1, width=SIZE, height=SIZE, guidance_scale=5.0,
                             init_image=circle_image(), strength=1.0)


@pytest.fixture(scope="module")
def explanation(sd, request_):
    return explain(sd, request_, snapshots=2)


def test_attention_probabilities_are_the_weights_sdpa_applies():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 16, generator=gen)
    k, v = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    probs = attention_probabilities(q, k, num_heads=4)  # (B, heads, Tq, Tk)
    assert probs.shape == (2, 4, 12, 7)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 12), atol=1e-6)
    by_hand = (probs @ v.view(2, 7, 4, 4).transpose(1, 2)).transpose(1, 2).reshape(2, 12, 16)
    assert torch.allclose(by_hand, attention(q, k, v, 4), atol=1e-5)


def test_watching_cross_attention_changes_nothing_and_leaves_nothing_behind(sd):
    gen = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 16, 12, generator=gen), torch.randn(2, 77, sd.config.text.width, generator=gen)
    t = torch.tensor([500, 20])
    plain = sd.unet(x, t, context)
    seen = []
    with watch_cross_attention(sd.unet, lambda name, probs, H, W: seen.append((name, probs.shape, H, W))):
        watched = sd.unet(x, t, context)
        with pytest.raises(RuntimeError, match="does not nest"):
            with watch_cross_attention(sd.unet, lambda *a: None):
                pass
    assert torch.equal(plain, watched)
    c = sd.config.unet
    # each attention level: num_res_blocks down + (num_res_blocks + 1) up; one more in the middle
    assert len(seen) == sum(c.attention_levels) * (2 * c.num_res_blocks + 1) + 1
    assert {(H, W) for _, _, H, W in seen} == {(16, 12), (8, 6)}
    for name, shape, H, W in seen:
        assert name.endswith(".attn2") and shape == (2, H * W, 77)
    transformers = [m for m in sd.unet.modules() if isinstance(m, SpatialTransformer)]
    assert all(not m._forward_pre_hooks for m in transformers)
    assert all(b.attn2.observer is None and b.attn1.observer is None
               for m in transformers for b in m.transformer_blocks)


def test_explanation_keeps_every_step_and_the_guidance_halves(explanation, request_):
    e, scale = explanation, request_.guidance_scale
    latent_shape = (4, SIZE // 2, SIZE // 2)  # the tiny VAE downsamples by 2
    assert len(e.steps) == request_.steps == len(e.guidance)
    assert [s.index for s in e.steps] == list(range(request_.steps))
    sigmas = [s.sigma for s in e.steps] + [e.steps[-1].sigma_next]
    assert sigmas == sorted(sigmas, reverse=True)
    for step, g in zip(e.steps, e.guidance):
        assert step.x0.shape == step.z.shape == g.x0_cond.shape == g.x0_uncond.shape == latent_shape
        assert g.sigma == pytest.approx(step.sigma, rel=1e-6)
        # the step used exactly the guided combination of the two halves the observer saw
        assert torch.allclose(step.x0, g.x0_uncond + scale * (g.x0_cond - g.x0_uncond), atol=1e-5)
        assert not torch.allclose(g.x0_cond, g.x0_uncond)
    assert torch.allclose(e.steps[-1].z, e.latents, atol=1e-6)  # the last step's sample is the final latent


def test_explanation_attention_maps_are_distributions(explanation, sd):
    e = explanation
    # at most 8 shown (the default): the start token, the first 6 words, the end token after "left"
    assert e.tokens == ["<start>", "a", "red", "circle", "at", "the", "top", "<end>"]
    assert e.token_positions == [0, 1, 2, 3, 4, 5, 6, 8]
    assert set(e.attention) == {(16, 16), (8, 8)}
    c = sd.config.unet
    assert len(e.attention_layers[(16, 16)]) == 2 * c.num_res_blocks + 1
    assert len(e.attention_layers[(8, 8)]) == 2 * c.num_res_blocks + 1 + 1  # and the middle block
    for (H, W), probs in e.attention.items():
        assert probs.shape == (77, H, W)
        # every image position spreads exactly all of its attention over the 77 context positions
        assert torch.allclose(probs.sum(0), torch.ones(H, W), atol=1e-5)
        maps = e.token_maps((H, W))
        assert maps.shape == (len(e.tokens), H, W) and (maps >= 0).all()
        assert torch.allclose(maps.sum((1, 2)), torch.ones(len(e.tokens)), atol=1e-5)


def test_explain_shows_the_words_asked_for(sd, request_):
    e = explain(sd, request_, snapshots=1, words=("left", "red"))
    assert e.tokens == ["<start>", "red", "left", "<end>"] and e.token_positions == [0, 2, 7, 8]
    with pytest.raises(ValueError, match=r"\['blue'\] are not tokens of the prompt"):
        explain(sd, request_, snapshots=1, words=("red", "blue"))


def test_explanation_images_and_forward_process(explanation):
    e = explanation
    assert e.init_image.shape == (3, SIZE, SIZE) and e.init_latents.shape == (4, SIZE // 2, SIZE // 2)
    assert e.image.shape == (3, SIZE, SIZE)
    ts = [n.timestep for n in e.noising]
    assert ts == sorted(ts) and ts[0] == 0 and ts[-1] == 999
    alpha_bars = [n.alpha_bar for n in e.noising]
    assert alpha_bars == sorted(alpha_bars, reverse=True) and alpha_bars[0] > 0.99 and alpha_bars[-1] < 0.01
    # z_t = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps from the input image's latents, with one eps for
    # all t: the noise the run itself added (the seed's draw after the init image's posterior sample)
    z0 = e.init_latents
    eps = [(n.z - n.alpha_bar ** 0.5 * z0) / (1 - n.alpha_bar) ** 0.5 for n in e.noising]
    for other in eps[1:]:
        assert torch.allclose(other, eps[-1], atol=1e-3)
    assert eps[-1].std() == pytest.approx(1.0, abs=0.1) and eps[-1].mean().abs() < 0.1
    assert abs(torch.corrcoef(torch.stack([z0.flatten(), eps[-1].flatten()]))[0, 1]) < 0.15
    generator = torch.Generator().manual_seed(explanation.result.seeds[0])
    torch.randn(z0.shape, generator=generator)  # the posterior draw of encode_image
    assert torch.allclose(eps[-1], torch.randn(z0.shape, generator=generator), atol=1e-3)
    # decoded for the report: all noised latents, two snapshots of x and x0, the guidance halves
    assert {f"noised/{t}" for t in ts} | {"z/0", "x0/0", "z/2", "x0/2", "reconstruction"} <= set(e.decoded)
    assert all(image.shape == (3, SIZE, SIZE) for image in e.decoded.values())


def test_report_is_written_as_png_and_html(explanation, tmp_path):
    from torchsd.explain.report import explanation_sections, write_report

    sections = explanation_sections(explanation)
    assert [s.name for s in sections] == ["autoencoder", "forward-process", "denoising", "cross-attention",
                                          "guidance", "decoder"]
    png = write_report(sections, tmp_path / "r.png", "test")
    with Image.open(png) as image:
        assert image.mode == "RGB" and image.height > image.width > 0  # six sections stacked
    page = write_report(sections, tmp_path / "r.html", "test").read_text()
    assert page.count("data:image/png;base64,") == len(sections)
    assert all(s.title in page for s in sections)


def test_generate_calls_the_guidance_observer_only_when_guiding(sd):
    calls = []
    observer = lambda sigma, cond, uncond: calls.append((sigma.shape, cond.shape, uncond.shape))  # noqa: E731
    sd.generate(PROMPT, steps=2, seed=0, width=16, height=16, guidance_scale=3.0, observer=observer)
    assert calls == [((1,), (1, 4, 8, 8), (1, 4, 8, 8))] * 2
    calls.clear()
    sd.generate(PROMPT, steps=2, seed=0, width=16, height=16, guidance_scale=1.0, observer=observer)
    assert calls == []


def test_explain_refuses_batches(sd):
    with pytest.raises(ValueError, match="explain follows one image; got batch_size=2"):
        explain(sd, GenerationRequest(PROMPT, batch_size=2, steps=1))


@pytest.mark.parametrize("argv, message", [
    (["explain", "a cat", "--out", "report.pdf"], "must end in .png or .html"),
    (["explain"], "give a prompt to explain"),
    (["explain", "a cat", "--snapshots", "0"], "--snapshots must be at least 1"),
    (["explain", "--toy", "--out", "toy.jpg"], "must end in .png or .html"),
    (["explain", "a cat", "--toy"], "--toy trains its own 2-D model and takes no prompt"),
    (["explain", "a cat", "--words", "dog", "--steps", "1", "--size", "64x64"], "['dog'] are not tokens of the prompt"),
    (["explain", "a cat", "--words", " , "], "--words needs at least one of the prompt's words"),
])
def test_cli_errors_teach_the_fix(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_writes_a_report_for_any_model_folder(sd, tmp_path, capsys):
    sd.save(tmp_path / "tiny")
    out = tmp_path / "report.html"
    argv = ["explain", PROMPT, "--model", str(tmp_path / "tiny"), "--size", "16x16", "--steps", "2",
            "--snapshots", "1", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    assert str(out) in capsys.readouterr().out
    assert out.read_text().count("<h2>") == 5  # no --image: no autoencoder section


def test_explain_on_sdxl_attends_over_both_encoders_tokens(tmp_path):
    """SDXL: one context of 77 token positions, each holding both encoders' features side by side (CLIP-L's
    768 and bigG's 1280 at full size), so one map per token covers both; only the lower level has attention."""
    from sdxl_reference import random_sdxl
    from torchsd.explain.report import explanation_sections, write_report

    sd = random_sdxl("sdxl", seed=3)
    request = GenerationRequest(PROMPT, "blurry", steps=2, seed=1, width=SIZE, height=SIZE, guidance_scale=5.0)
    seen = []
    context = sd.condition([PROMPT]).context
    assert context.shape == (1, 77, sd.config.text.width + sd.config.text_2.width)
    with watch_cross_attention(sd.unet, lambda name, probs, H, W: seen.append((name, probs.shape[-1], H, W))):
        sd.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), context, torch.zeros(1, sd.config.unet.added_embed_dim))
    assert seen and all(tokens == 77 for _, tokens, _, _ in seen)
    result = explain(sd, request, snapshots=1)
    assert result.tokens[0] == "<start>" and result.tokens[-1] == "<end>" and "red" in "".join(result.tokens)
    latent = SIZE // sd.config.vae.downscale_factor
    assert set(result.attention) == {(latent // 2, latent // 2)}  # the top level (no attention) is skipped
    maps = result.token_maps((latent // 2, latent // 2))
    assert maps.shape == (len(result.tokens), latent // 2, latent // 2)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(len(result.tokens)), atol=1e-5)
    page = write_report(explanation_sections(result), tmp_path / "xl.html", "sdxl").read_text()
    assert "Cross-attention" in page
