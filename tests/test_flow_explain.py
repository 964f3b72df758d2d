"""torchsd explain on SD 3 and FLUX.1: the attention maps it reports (image-patch queries on text keys of the joint
attention, averaged over heads, blocks and calls) equal the same block of the attention diffusers' own
SD3Transformer2DModel / FluxTransformer2DModel computes on the same weights and inputs (its queries and keys taken
where they enter scaled_dot_product_attention); watching changes nothing; the report is written for both."""

import pytest
import torch

import flow_reference as ref
import torchsd
from reference import max_rel_error
from torchsd.explain.flow_trace import explain_flow, watch_joint_attention
from torchsd.pipeline import GenerationRequest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    work = tmp_path_factory.mktemp("flow_explain")
    references = {"sd3": ref.sd3_pipeline(work), "flux": ref.flux_pipeline(work)}
    folders = {name: ref.saved(pipe, work / name) for name, pipe in references.items()}
    return references, folders


def diffusers_maps(transformer, inputs: dict, monkeypatch, text_first: bool) -> list[torch.Tensor]:
    """Each joint attention's image-query x text-key probabilities (N, L) on the last batch row, averaged over
    heads, from the q and k diffusers hands to scaled_dot_product_attention (SD 3: image tokens first; FLUX.1: text
    first; MMDiT-X's image-only attention, whose keys are the image's alone, is left out)."""
    captured = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        captured.append((query[-1].detach(), key[-1].detach()))  # (heads, T, d)
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        transformer(**inputs)
    monkeypatch.undo()
    N = inputs["hidden_states"].shape[-2] * inputs["hidden_states"].shape[-1] // 4
    if text_first:  # FLUX.1's packed latents: N is the token count itself
        N = inputs["hidden_states"].shape[1]
    L = inputs["encoder_hidden_states"].shape[1]
    maps = []
    for q, k in captured:
        if k.shape[1] != N + L:
            continue
        image, text = (slice(L, None), slice(0, L)) if text_first else (slice(0, N), slice(N, None))
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # (heads, T, T)
        maps.append(probs[:, image, text].mean(0))
    return maps


def transformer_call(pipe, request):
    """Explain ``request`` and keep the inputs of each transformer call of the run."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        explanation = explain_flow(pipe, request, snapshots=2)
    finally:
        handle.remove()
    return explanation, calls


def test_sd3_maps_equal_the_joint_attention_of_sd3_transformer_2d_model(models, monkeypatch):
    references, folders = models
    pipe = torchsd.load_pipeline(folders["sd3"], "cpu", torch.float32)
    request = GenerationRequest("a cat on a red chair", "zebra", width=32, height=32, steps=1, seed=3,
                                guidance_scale=4.0, sampler="euler")
    explanation, calls = transformer_call(pipe, request)
    assert len(calls) == 1  # one step, both halves in one call
    (x, t, context, pooled), _ = calls[0]
    theirs = diffusers_maps(references["sd3"].transformer, dict(
        hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled), monkeypatch,
        text_first=False)
    assert len(theirs) == 2  # one joint attention per block; block 0's image-only second attention left out
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    expected = torch.stack(theirs).mean(0).reshape(h, w, -1).permute(2, 0, 1)  # (L, h, w)
    assert list(explanation.attention) == [(h, w)] and explanation.attention_layers[(h, w)] == ["blocks.0", "blocks.1"]
    assert max_rel_error(explanation.attention[(h, w)], expected) < 1e-4
    assert explanation.attention[(h, w)].shape[0] == 77 + 256  # CLIP's positions, then T5's
    assert explanation.tokens[0] == "CLIP <start>" and explanation.tokens[-1] == "T5 </s>"
    assert explanation.token_positions[-1] >= 77 and len(explanation.guidance) == 1


def test_flux_maps_equal_the_joint_attention_of_flux_transformer_2d_model(models, monkeypatch):
    """Double- and single-stream blocks, with the rotary positions applied to q and k."""
    from diffusers import FluxPipeline

    references, folders = models
    pipe = torchsd.load_pipeline(folders["flux"], "cpu", torch.float32)
    request = GenerationRequest("an astronaut riding a horse", width=32, height=32, steps=1, seed=5,
                                distilled_cfg_scale=3.0)
    explanation, calls = transformer_call(pipe, request)
    (x, t, context, pooled), kwargs = calls[0]
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    reference = references["flux"]
    L = context.shape[1]
    inputs = dict(hidden_states=FluxPipeline._pack_latents(x, 1, 16, x.shape[-2], x.shape[-1]), timestep=t / 1000,
                  encoder_hidden_states=context, pooled_projections=pooled, guidance=kwargs["guidance"],
                  txt_ids=torch.zeros(L, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu",
                                                                                             torch.float32))
    theirs = diffusers_maps(reference.transformer, inputs, monkeypatch, text_first=True)
    assert len(theirs) == 3  # 1 double-stream + 2 single-stream blocks
    expected = torch.stack(theirs).mean(0).reshape(h, w, -1).permute(2, 0, 1)
    assert max_rel_error(explanation.attention[(h, w)], expected) < 1e-4
    assert explanation.attention_layers[(h, w)] == ["double_blocks.0", "single_blocks.0", "single_blocks.1"]
    assert explanation.tokens[-1] == "T5 </s>" and explanation.guidance == []  # distilled guidance: one call


def test_watching_changes_nothing_and_skip_layer_calls_are_not_counted(models):
    _, folders = models
    pipe = torchsd.load_pipeline(folders["sd3"], "cpu", torch.float32)
    run = dict(width=32, height=32, steps=6, seed=1, guidance_scale=4.0, skip_guidance_layers=[1],
               skip_layer_guidance_stop=0.7)
    plain = pipe.generate("a cat", "zebra", **run)
    seen = []
    with watch_joint_attention(pipe.transformer, lambda name, probs, h, w: seen.append(name)):
        watched = pipe.generate("a cat", "zebra", **run)
    assert torch.equal(plain.latents, watched.latents)
    assert len(seen) == 2 * 6  # two blocks per guided call; the 4 skip-layer calls are left out
    assert not any(hook for m in pipe.transformer.modules() for hook in (m._forward_hooks, m._forward_pre_hooks))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cli_writes_the_report_for_flow_models(models, name, tmp_path, capsys):
    from PIL import Image

    from torchsd.cli import main

    _, folders = models
    out = tmp_path / "explain.png"
    assert main(["explain", "a red chair", "--model", str(folders[name]), "--dtype", "fp32", "--device", "cpu",
                 "--steps", "3", "--size", "32x32", "--sampler", "dpmpp_2m", "--cfg", "3", "-n", "blurry",
                 "--snapshots", "2", "-o", str(out)]) == 0
    assert Image.open(out).size[1] > 1000 and "seed 0" in capsys.readouterr().out
    assert main(["explain", "a red chair", "--model", str(folders[name]), "--control", str(out), "--control-model",
                 "bundled", "-o", str(tmp_path / "x.png")]) == 2
    assert "ControlNet units are not available for flow models" in capsys.readouterr().err
