"""The `scenes` dataset (bundled model v2's data) and the reader that counts and reads several shapes."""

import random
import re

from PIL import Image

from torchsd.training.data import COLORS, ShapeSpec, build_dataset, render_shape
from torchsd.training.evaluate import read_scene_image
from torchsd.training.scenes import (
    CELL_NAMES,
    FRAMES,
    HELD_OUT_CELL_NAMES,
    HELD_OUT_FRAMES,
    TRAINING_FRAMES,
    Scene,
    ScenesDataset,
    phrase,
    random_scene,
    render_scene,
)


def test_reader_reads_every_object_of_the_dataset_renders():
    dataset = ScenesDataset(64, seed=3)
    counts = {1: 0, 2: 0}
    for i in range(300):
        scene, _, rng = dataset.item(i)
        counts[len(scene.objects)] += 1
        reading = read_scene_image(render_scene(scene, 64, rng))
        assert reading.matches(scene.objects), (scene, reading)
    assert min(counts.values()) > 100  # both kinds of scene are there


def test_reader_counts_an_extra_copy_and_a_missing_object():
    spec = ShapeSpec("circle", "red", "top left", "blue")
    copy = ShapeSpec("circle", "red", "top right", "blue")
    two = render_scene(Scene((spec, copy)), 64, random.Random(1))
    reading = read_scene_image(two)
    assert len(reading.objects) == 2 and not reading.matches((spec,))
    assert not read_scene_image(render_shape(spec, 64, random.Random(1))).matches((spec, copy))
    empty = read_scene_image(Image.new("RGB", (64, 64), COLORS["blue"]))
    assert empty.background == "blue" and empty.objects == ()


def test_two_object_scenes_have_distinct_colours_and_cells():
    rng = random.Random(0)
    for _ in range(200):
        a, b = random_scene(rng, 2).objects
        assert len({a.color, b.color, a.background}) == 3 and a.position != b.position
        assert a.background == b.background


def test_training_captions_never_use_the_held_out_phrasings():
    dataset = ScenesDataset(64, seed=0)
    held_names = set(HELD_OUT_CELL_NAMES.values())
    captions = []
    for i in range(500):
        scene, caption, _ = dataset.item(i)
        assert not any(name in caption for name in held_names), caption
        assert not held_out_frame(caption), caption
        for spec in scene.objects:
            assert spec.color in caption and spec.shape in caption
        captions.append(caption)
    assert not held_names & {name for names in CELL_NAMES.values() for name in names}
    # every training frame is used, the ones beyond the benchmark's FRAMES included
    for frame in TRAINING_FRAMES:
        pattern = re.escape(frame).replace(re.escape("{objects}"), ".+").replace(re.escape("{bg}"), r"an? \w+")
        assert any(re.fullmatch(pattern, c) for c in captions), frame
    assert set(FRAMES) < set(TRAINING_FRAMES)


def test_held_out_captions_each_use_a_held_out_frame_or_cell_name():
    rng = random.Random(5)
    for _ in range(300):
        scene = random_scene(rng, rng.choice((1, 2)))
        caption = phrase(scene, rng, held_out=True)
        names = any(HELD_OUT_CELL_NAMES[s.position] in caption for s in scene.objects)
        assert names or held_out_frame(caption), caption
        assert scene.background in caption


def held_out_frame(caption: str) -> bool:
    """Whether ``caption`` is in one of HELD_OUT_FRAMES (the trained FRAMES match none of these)."""
    return bool(re.fullmatch(r"on an? \w+ background, .*|an? \w+ background, .*|.* against an? \w+ background",
                             caption))


def test_the_frame_check_tells_the_frames_apart():
    def fill(frame):
        return frame.format(objects="a red circle at the top", bg="a blue")

    assert all(held_out_frame(fill(f)) for f in HELD_OUT_FRAMES)
    assert not any(held_out_frame(fill(f)) for f in TRAINING_FRAMES)


def test_scenes_is_a_dataset_name():
    data = build_dataset("scenes+emoji", 32, length=10)
    image, caption = data[0]
    assert image.shape == (3, 32, 32) and "background" in caption
