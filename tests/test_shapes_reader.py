"""The shapes reader used to measure prompt adherence is exact on the dataset's own renders."""

from PIL import Image

from torchsd.training.data import ShapesDataset, ShapeSpec, render_shape
from torchsd.training.evaluate import read_shape_image


def test_reader_is_exact_on_renders():
    dataset = ShapesDataset(64, seed=5)
    for i in range(300):
        spec, rng = dataset.spec(i)
        reading = read_shape_image(render_shape(spec, 64, rng))
        assert all(reading.matches(spec).values()), (spec, reading)


def test_reader_reports_an_empty_picture():
    reading = read_shape_image(Image.new("RGB", (64, 64), (35, 70, 220)))
    assert reading.background == "blue" and reading.shape is None and reading.position is None
    assert not reading.matches(ShapeSpec("circle", "red", "center", "blue"))["shape"]
