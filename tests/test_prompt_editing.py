"""Prompt editing ``[from:to:when]``, alternation ``[a|b]`` and composable diffusion ``AND``, as AUTOMATIC1111
reads them: A1111's own doctest vectors for the schedules, and runs that equal, step for step, a run whose
conditioning a hand-written denoiser switches."""

import pytest
import torch

from reference import random_pipeline
from torchsd.diffusion.denoisers import classifier_free_guidance, composable_guidance
from torchsd.diffusion.samplers import sampler_options
from torchsd.pipeline import GenerationRequest
from torchsd.pipeline import run as steps
from torchsd.pipeline.features.prompt_editing import PROMPT_EDITING, step_index
from torchsd.pipeline.infotext import request_fields
from torchsd.text.prompt_schedule import has_schedule, is_composable, prompt_schedule, split_composable, text_at_step

# --- the schedules: AUTOMATIC1111's doctests of get_learned_conditioning_prompt_schedules ------------------

@pytest.mark.parametrize("prompt, expected", [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
])
def test_a1111_doctest_schedules(prompt, expected):
    assert [list(entry) for entry in prompt_schedule(prompt, 10)] == expected


@pytest.mark.parametrize("prompt, expected", [  # the hires pass: get_learned_conditioning_prompt_schedules(.., 10, 10)
    ("a [b:.5] c", [[10, "a b c"]]),
    ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [b:15] c", [[5, "a  c"], [10, "a b c"]]),  # step numbers count on from the first pass's 10
])
def test_a1111_doctest_hires_schedules(prompt, expected):
    assert [list(entry) for entry in prompt_schedule(prompt, 10, 10)] == expected


@pytest.mark.parametrize("prompt, expected", [
    ("a [cat:dog:0.25] on [a mat:the grass:3]", [[2, "a cat on a mat"], [3, "a dog on a mat"],
                                                 [10, "a dog on the grass"]]),
    ("[a:b:1.0]", [[10, "a"]]),  # with a point it is a fraction: all the steps
    ("[a:b:0]", [[10, "b"]]),
    ("[a:b:-3]", [[10, "b"]]),
    ("[a:b:99]", [[10, "a"]]),
    ("[a::4]", [[4, "a"], [10, ""]]),
    ("a | b", [[10, "a | b"]]),  # outside the grammar: the prompt as it is
    ("\\[a:b:3\\]", [[10, "\\[a:b:3\\]"]]),  # escaped brackets stay text
    ("[a:5:3]", [[3, "a"], [10, "5"]]),
    ("([red:blue:2] cat:1.2)", [[2, "(red cat:1.2)"], [10, "(blue cat:1.2)"]]),
])
def test_more_schedules(prompt, expected):
    assert [list(entry) for entry in prompt_schedule(prompt, 10)] == expected


def test_deep_nesting_is_kept_as_text_not_a_crash():
    prompt = "[" * 5000 + "a:b:3" + "]" * 5000
    assert prompt_schedule(prompt, 10) == [(10, prompt)]
    assert not has_schedule(prompt)
    deep = "[" * 50 + "a:b:3" + "]" * 50
    assert [text for _, text in prompt_schedule(deep, 10)] == ["[" * 49 + "a" + "]" * 49, "[" * 49 + "b" + "]" * 49]


def test_a_sampler_step_uses_the_first_entry_that_lasts_to_it():
    schedule = prompt_schedule("a [b:3]", 10)  # A1111: steps 0..3 (0-based) use "a ", 4..9 "a b"
    assert [text_at_step(schedule, step) for step in range(10)] == ["a "] * 4 + ["a b"] * 6
    alternating = prompt_schedule("[cat|dog]", 4)
    assert [text_at_step(alternating, step) for step in range(4)] == ["cat", "cat", "dog", "cat"]


def test_composable_prompts_split_as_a1111():
    assert split_composable("a cat :1.2 AND a dog :0.8") == [("a cat", 1.2), (" a dog", 0.8)]
    assert split_composable("a cat AND a dog") == [("a cat", 1.0), (" a dog", 1.0)]
    assert split_composable("a cat: 0.5") == [("a cat", 0.5)]
    assert split_composable("cats ANDROID") == [("cats ANDROID", 1.0)]
    assert is_composable("a AND b") and is_composable("a cat :0.5")
    assert not is_composable("a cat") and not is_composable("a (cat:1.2)") and not is_composable("a cat and dog")


def test_plain_and_attention_prompts_are_not_scheduled():
    for prompt in ("a cat", "a (red:1.2) [circle]", "[[a]] b", "a [unbalanced", "((a))"):
        assert not has_schedule(prompt) and not is_composable(prompt)
        assert not PROMPT_EDITING.active_in(GenerationRequest(prompt))
    assert PROMPT_EDITING.active_in(GenerationRequest("a [red:blue:2] cat"))
    assert PROMPT_EDITING.active_in(GenerationRequest("a cat", negative_prompt="[ugly|bad]"))
    assert PROMPT_EDITING.active_in(GenerationRequest("a cat AND a dog"))


def test_step_index_is_the_position_of_sigma_in_the_loop():
    levels = [14.6, 7.0, 2.5, 0.8, 0.0]
    assert [step_index(levels, s) for s in levels[:-1]] == [0, 1, 2, 3]
    assert step_index(levels, 5.0) == 1  # between levels (DPM2's midpoint): the step it is in
    assert step_index(levels, torch.tensor([2.5, 2.5])) == 2
    assert step_index(levels, 0.0) == 3


# --- runs against hand-switched denoisers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


def hand_run(sd, request, denoise_for_call):
    """The run's steps with a denoiser built by hand: ``denoise_for_call(k)`` is the denoiser of call k."""
    run = steps.plan(sd, request)
    steps.schedule(sd, request, run)
    x = steps.start_latents(sd, request, run)
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        return denoise_for_call(len(calls) - 1)(x, sigma)

    levels = run.sigmas.to("cpu", torch.float32)
    x = run.spec.function(denoise, x, levels, **sampler_options(run.spec, run.generators, request.eta))
    return x / (1 + run.sigmas[-1].item() ** 2) ** 0.5, len(calls)


def guided(sd, prompt, negative="", scale=7.0):
    return classifier_free_guidance(sd.denoiser, sd.condition([prompt]).context, sd.condition([negative]).context,
                                    scale)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_prompt_editing_equals_a_hand_switched_run(sd, sampler):
    request = GenerationRequest("a [(red:1.2):blue:0.5] cat", negative_prompt="[blurry::1]", steps=4, seed=3,
                                width=16, height=16, guidance_scale=7.0, sampler=sampler)
    # 0.5 of 4 steps: "(red:1.2)" to steps 0, 1, 2 (0-based, as A1111 counts), then "blue"; "blurry" to 0, 1
    red_blurry, red, blue = (guided(sd, "a (red:1.2) cat", "blurry"), guided(sd, "a (red:1.2) cat"),
                             guided(sd, "a blue cat"))
    expected, calls = hand_run(sd, request, lambda k: [red_blurry, red_blurry, red, blue][k])
    assert calls == 4
    result = sd.generate(request)
    assert torch.equal(result.latents, expected)
    assert result.infotexts[0].startswith("a [(red:1.2):blue:0.5] cat\nNegative prompt: [blurry::1]\n")


def test_alternation_equals_a_hand_alternated_run(sd, monkeypatch):
    request = GenerationRequest("a [cat|dog|(bird:1.3)]", steps=5, seed=4, width=16, height=16, sampler="Euler")
    cat, dog, bird = guided(sd, "a cat", scale=7.5), guided(sd, "a dog", scale=7.5), guided(sd, "a (bird:1.3)",
                                                                                           scale=7.5)
    # A1111's schedule [[1, cat], [2, dog], [3, bird], [4, cat], [5, dog]] read at 0-based steps 0..4
    expected, _ = hand_run(sd, request, lambda k: [cat, cat, dog, bird, cat][k])
    encoded = []
    condition = sd.condition
    monkeypatch.setattr(sd, "condition", lambda prompts, clip_skip=None: encoded.append(tuple(prompts))
                        or condition(prompts, clip_skip))
    assert torch.equal(sd.generate(request).latents, expected)
    assert sorted(encoded) == sorted([("a cat",), ("a dog",), ("a (bird:1.3)",), ("",)])  # once per text


def test_a_prompt_without_the_syntax_runs_the_plain_path_bit_identically(sd, monkeypatch):
    request = GenerationRequest("a (red:1.2) [cat]", steps=3, seed=5, width=16, height=16)
    plain = guided(sd, "a (red:1.2) [cat]", scale=7.5)
    expected, _ = hand_run(sd, request, lambda k: plain)
    assert PROMPT_EDITING not in request.active()
    assert torch.equal(sd.generate(request).latents, expected)


def test_composable_diffusion_equals_a_hand_written_two_prompt_denoiser(sd):
    request = GenerationRequest("a red cat :1.2 AND a blue dog :0.8", negative_prompt="blurry", steps=3, seed=6,
                                width=16, height=16, guidance_scale=5.0, sampler="Euler")
    cat, dog, uncond = (sd.condition([p]).context for p in ("a red cat", " a blue dog", "blurry"))

    def two_prompts(x, sigma):
        x0_uncond, x0_cat, x0_dog = (sd.denoiser(x, sigma, c) for c in (uncond, cat, dog))
        return x0_uncond + 1.2 * 5.0 * (x0_cat - x0_uncond) + 0.8 * 5.0 * (x0_dog - x0_uncond)

    expected, _ = hand_run(sd, request, lambda k: two_prompts)
    got = sd.generate(request).latents
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and it is not plain guidance of either prompt
    assert not torch.allclose(got, hand_run(sd, request, lambda k: guided(sd, "a red cat", "blurry", 5.0))[0],
                              atol=1e-3)


def test_composable_diffusion_with_editing_inside_a_sub_prompt(sd):
    request = GenerationRequest("a [red:blue:1] cat AND a dog :0.5", steps=3, seed=7, width=16, height=16,
                                guidance_scale=4.0, sampler="Euler")
    uncond = sd.condition([""]).context

    def at(first):
        cat, dog = sd.condition([f"a {first} cat "]).context, sd.condition([" a dog"]).context

        def denoise(x, sigma):
            x0_uncond, x0_cat, x0_dog = (sd.denoiser(x, sigma, c) for c in (uncond, cat, dog))
            return x0_uncond + 4.0 * (x0_cat - x0_uncond) + 0.5 * 4.0 * (x0_dog - x0_uncond)
        return denoise

    red, blue = at("red"), at("blue")
    expected, _ = hand_run(sd, request, lambda k: [red, red, blue][k])
    torch.testing.assert_close(sd.generate(request).latents, expected, rtol=1e-4, atol=1e-4)


def test_composable_guidance_splits_batches_and_matches_context_lengths(sd):
    long = "tall " * 80  # two chunks: (1, 154, W)
    conds = [sd.condition([p]).context for p in ("a cat", long, "a dog", "a bird")]
    uncond = torch.cat([sd.condition([""]).context] * 2)
    weights = [[1.0, 0.5], [0.7, -0.2]]
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    expected = []
    for b, (rows, ws) in enumerate(zip([conds[:2], conds[2:]], weights)):
        x0_u = sd.denoiser(x[b:b + 1], sigma[b:b + 1], uncond[b:b + 1])
        total = x0_u.clone()
        for c, w in zip(rows, ws):
            total += (sd.denoiser(x[b:b + 1], sigma[b:b + 1], c) - x0_u) * (w * 6.0)
        expected.append(total)
    seen = []
    for max_rows in (1, 8):
        got = composable_guidance(sd.denoiser, conds, weights, uncond, 6.0, max_rows=max_rows,
                                  observer=lambda *args: seen.append(args))(x, sigma)
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-4)
    _, x0_cond, x0_uncond = seen[-1]  # the combination at scale 1: plain guidance's formula gives x0
    torch.testing.assert_close(x0_uncond + 6.0 * (x0_cond - x0_uncond), got, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cond rows"):
        composable_guidance(sd.denoiser, conds[:3], weights, uncond, 6.0)


def test_hires_pass_has_its_own_schedule(sd, monkeypatch):
    encoded = []
    condition = sd.condition
    monkeypatch.setattr(sd, "condition", lambda prompts, clip_skip=None: encoded.append(tuple(prompts))
                        or condition(prompts, clip_skip))
    base = dict(steps=4, seed=8, width=16, height=16, sampler="Euler")
    sd.generate("a [red:blue:5] cat", **base)  # step 5 of 4: never in the first pass
    assert ("a blue cat",) not in encoded
    encoded.clear()
    result = sd.generate("a [red:blue:5] cat", hires=True, hires_scale=1.5, hires_steps=4, hires_strength=1.0,
                         **base)  # the hires pass: step 5 - 4 = 1 of its own 4
    assert ("a red cat",) in encoded and ("a blue cat",) in encoded
    assert result.infotexts[0].startswith("a [red:blue:5] cat\n")


def test_infotext_round_trip_reproduces_the_run(sd):
    first = sd.generate("a [red:blue:0.5] cat AND a dog :0.7", negative_prompt="[ugly|bad]", steps=3, seed=9,
                        width=16, height=16, sampler="DDIM")
    fields = request_fields(first.infotexts[0])
    assert fields["prompt"] == "a [red:blue:0.5] cat AND a dog :0.7" and fields["negative_prompt"] == "[ugly|bad]"
    again = sd.generate(**fields)
    assert torch.equal(first.latents, again.latents)


def test_batch_of_images_with_edited_prompt(sd):
    one = sd.generate("a [red:blue:2] cat AND a dog", steps=3, seed=10, width=16, height=16, sampler="Euler")
    two = sd.generate("a [red:blue:2] cat AND a dog", steps=3, seed=10, width=16, height=16, sampler="Euler",
                      batch_size=2)
    # A batch of two runs other matrix shapes than a batch of one, so float32 rounding differs a little
    # over the guided steps: the bar's ~1e-3 for a short guided run, not a single network's 1e-4.
    torch.testing.assert_close(two.latents[:1], one.latents, rtol=1e-3, atol=1e-3)


def test_cli_prompt_editing_and_from_reproduce(sd, tmp_path):
    from PIL import Image

    from torchsd.cli import main
    from torchsd.pipeline.infotext import read_png_infotext

    sd.save(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--device", "cpu"]
    prompt = "a [(red:1.2):blue:0.5] cat :1.1 AND a [dog|bird]"
    assert main(["generate", prompt, "--steps", "3", "--size", "16x16", "--seed", "5", "--sampler", "Euler",
                 "--output", str(tmp_path / "a.png"), *common]) == 0
    assert read_png_infotext(tmp_path / "a.png").startswith(prompt + "\n")
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png"), *common]) == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


@pytest.mark.parametrize("sampler", ["heun", "dpm2", "dpmpp_2s_a", "dpmpp_2m_sde", "plms", "unipc", "lms", "ddpm"])
def test_every_sampler_switches_the_prompt(sd, monkeypatch, sampler):
    encoded = []
    condition = sd.condition
    monkeypatch.setattr(sd, "condition", lambda prompts, clip_skip=None: encoded.append(tuple(prompts))
                        or condition(prompts, clip_skip))
    result = sd.generate("a [red:blue:0.5] cat AND a dog", steps=4, seed=11, width=16, height=16, sampler=sampler)
    assert torch.isfinite(result.latents).all()
    assert {("a red cat",), ("a blue cat",), (" a dog",), ("",)} == set(encoded)


def test_image_to_image_counts_the_steps_it_runs(sd, monkeypatch):
    from PIL import Image

    encoded = []
    condition = sd.condition
    monkeypatch.setattr(sd, "condition", lambda prompts, clip_skip=None: encoded.append(tuple(prompts))
                        or condition(prompts, clip_skip))
    picture = Image.new("RGB", (16, 16), (200, 30, 30))
    sd.generate("a [red:blue:2] cat", init_image=picture, strength=0.5, steps=8, seed=12, sampler="Euler")
    # 4 of the 8 steps run, counted from 0 as A1111's counter restarts: steps 0-2 red, then blue
    assert ("a red cat",) in encoded and ("a blue cat",) in encoded


@pytest.mark.parametrize("sampler, expected", [
    ("euler", [0, 1, 2, 3]),
    ("ddim", [0, 1, 2, 3]),
    ("heun", [0, 1, 1, 2, 2, 3, 3]),  # the correction at the next level reads the next step's prompt
    ("dpm2", [0, 0, 1, 1, 2, 2, 3]),  # the midpoint reads the current step's
])
def test_steps_are_counted_by_sigma(sd, monkeypatch, sampler, expected):
    from torchsd.pipeline.features import prompt_editing

    seen = []
    monkeypatch.setattr(prompt_editing, "step_index", lambda levels, sigma: seen.append(step_index(levels, sigma))
                        or seen[-1])
    sd.generate("a [red:blue:2] cat", steps=4, seed=13, width=16, height=16, sampler=sampler)
    assert seen == expected
