"""Token merging (ToMe for SD): off, images are bit-identical; on, the U-Net matches the ``tomesd`` package
(use_rand=False) applied to diffusers' U-Net holding the same weights; the swap is undone after a run."""

from __future__ import annotations

import pytest
import torch

from reference import diffusers_unet, max_rel_error, random_pipeline
from torchsd.models.token_merging import TokenMergingTransformer, bipartite_soft_matching, token_merging
from torchsd.pipeline.infotext import parse_infotext, request_fields

RUN = dict(steps=4, guidance_scale=5.0, width=32, height=32, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1", seed=2)


def test_off_is_bit_identical_and_leaves_the_model_alone(sd):
    plain = sd.generate("a red circle", **RUN).latents
    assert torch.equal(plain, sd.generate("a red circle", tome_ratio=0.0, **RUN).latents)
    merged = sd.generate("a red circle", tome_ratio=0.5, **RUN)
    assert not torch.equal(plain, merged.latents)
    assert not any(isinstance(m, TokenMergingTransformer) for m in sd.unet.modules())
    assert torch.equal(plain, sd.generate("a red circle", **RUN).latents)


@pytest.mark.parametrize("family, ratio, max_downsample", [("sd1", 0.5, 1), ("sd1", 0.3, 2), ("sd1", 0.75, 8),
                                                            ("sd2", 0.5, 2)])
def test_unet_matches_tomesd(family, ratio, max_downsample):
    tomesd = pytest.importorskip("tomesd")
    sd = random_pipeline(family, seed=2)
    theirs_unet = diffusers_unet(sd)
    tomesd.apply_patch(theirs_unet, ratio=ratio, max_downsample=max_downsample, use_rand=False)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, sd.unet.config.context_dim, generator=gen)
    t = torch.tensor([501.0])
    with torch.no_grad():
        theirs = theirs_unet(z.repeat(2, 1, 1, 1), t, encoder_hidden_states=context).sample
        plain = sd.unet(z, t, context)
        with token_merging(sd.unet, ratio, max_downsample):
            ours = sd.unet(z, t, context)
    assert max_rel_error(plain, theirs) > 1e-3  # merging changed the output
    assert max_rel_error(ours, theirs) < 1e-4


def test_merge_then_unmerge_restores_tokens_that_were_not_merged():
    x = torch.randn(2, 8 * 6, 5, generator=torch.Generator().manual_seed(1))
    merge, unmerge = bipartite_soft_matching(x, 8, 6, r=12)
    merged = merge(x)
    assert merged.shape == (2, 48 - 12, 5)
    back = unmerge(merged)
    unchanged = (back == x).all(-1)
    assert int(unchanged.sum(-1).min()) >= 48 - 12 - 12  # kept sources exact; destinations took a mean


def test_options_in_infotext_cli_and_a1111(sd):
    from torchsd.pipeline.features import A1111Fields, owner_of

    result = sd.generate("a red circle", tome_ratio=0.5, **RUN)
    assert "Token merging ratio: 0.5" in result.infotexts[0]
    feature = owner_of("tome_ratio")
    assert feature.from_infotext(parse_infotext(result.infotexts[0]))["tome_ratio"] == 0.5
    assert request_fields(result.infotexts[0])["tome_ratio"] == 0.5
    fields = A1111Fields({"tome_ratio": 0.4}, img2img=False, width=None, height=None, decode_image=None)
    assert feature.from_a1111(fields)["tome_ratio"] == 0.4
    with pytest.raises(ValueError, match="tome_ratio must be between 0 .off. and 0.75"):
        sd.generate("a red circle", tome_ratio=0.9, **RUN)


def test_cli_flags_reach_the_request():
    from torchsd.cli import build_parser
    from torchsd.cli.flags import request_from_args

    args = build_parser().parse_args(["generate", "a cat", "--model", "x", "--tome-ratio", "0.4",
                                      "--tome-max-downsample", "2"])
    request = request_from_args(args)
    assert (request.tome_ratio, request.tome_max_downsample) == (0.4, 2)
