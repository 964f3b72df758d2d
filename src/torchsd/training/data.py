"""Training data: image-caption pairs as (3, S, S) tensors in [-1, 1] plus a caption string.

Sources: a folder of images with same-name .txt captions, a JSONL/CSV manifest, WebDataset-style tar
shards, and two built-in datasets, ``shapes`` (procedural) and ``emoji`` (Noto Color Emoji glyphs).
Images are resized on the short side and centre-cropped; they are never flipped, since captions speak
of left and right.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import ConcatDataset, Dataset

from ..images import pil_to_tensor
from .scenes import ScenesDataset
from .shapes import (  # noqa: F401 (re-exported: the shapes are read from here too)
    COLORS,
    POSITIONS,
    SHAPES,
    SUPERSAMPLE,
    ShapeSpec,
    draw_shape,
    random_shape_spec,
    render_shape,
    with_article,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

def square_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Where ``square_crop`` cuts: the resized (width, height) and the crop's (left, top) in it."""
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    return w, h, (w - size) // 2, (h - size) // 2


def square_crop(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` and centre-crop: (3, size, size) in [-1, 1]."""
    image = image.convert("RGB")
    w, h, left, top = square_crop_box(image.width, image.height, size)
    image = image.resize((w, h), Image.BICUBIC)
    return pil_to_tensor(image.crop((left, top, left + size, top + size)))[0]


Geometry = tuple[int, int, int, int]  # original (height, width), crop (top, left): SDXL's micro-conditioning


def crop_geometry(width: int, height: int, size: int) -> Geometry:
    """What SDXL is told of an image ``square_crop`` made (Podell et al. 2023, sec. 2.2): its size before
    scaling, and the crop's top-left corner in the scaled image, as diffusers' and kohya's SDXL scripts do."""
    _, _, left, top = square_crop_box(width, height, size)
    return height, width, top, left


def item_geometry(dataset: Dataset, index: int) -> Geometry | None:
    """``crop_geometry`` of item ``index`` of any dataset built here; None for an item made at its size."""
    if isinstance(dataset, ConcatDataset):
        part = bisect.bisect_right(dataset.cumulative_sizes, index)
        return item_geometry(dataset.datasets[part], index - (dataset.cumulative_sizes[part - 1] if part else 0))
    geometry = getattr(dataset, "geometry", None)
    return geometry(index) if geometry is not None else None


# --- shapes ----------------------------------------------------------------------------------------

class ShapesDataset(Dataset):
    """Deterministic from ``seed``: item i is always the same image and caption."""

    def __init__(self, size: int = 64, length: int = 100_000, seed: int = 0):
        self.size, self.length, self.seed = size, length, seed

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> tuple[ShapeSpec, random.Random]:
        rng = random.Random(self.seed * 1_000_003 + index)
        return random_shape_spec(rng), rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        spec, rng = self.spec(index)
        return pil_to_tensor(render_shape(spec, self.size, rng))[0], spec.caption

    def mask(self, index: int) -> Image.Image:
        """Item ``index``'s shape, white on black: the control image of a ControlNet trained on shapes."""
        spec, rng = self.spec(index)
        return render_shape(spec, self.size, rng, mask=True)


_POSITION_PHRASES = ["in the center" if p == "center" else f"at the {p}" for p in POSITIONS]


def reposition_caption(caption: str, rng: random.Random) -> str:
    """A shapes caption with its grid cell replaced by a random other one ("at the top left" -> "at the
    center right"); other captions unchanged."""
    for phrase in _POSITION_PHRASES:
        if f" {phrase} " in caption:
            other = rng.choice([p for p in _POSITION_PHRASES if p != phrase])
            return caption.replace(f" {phrase} ", f" {other} ", 1)
    return caption


# --- emoji -----------------------------------------------------------------------------------------

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_INSTALL = "apt-get install fonts-noto-color-emoji   (Debian/Ubuntu)"
# single-codepoint emoji of things with clear shapes and colours (animals, food, objects, nature)
EMOJI_RANGES = [(0x1F330, 0x1F37F), (0x1F400, 0x1F43E), (0x1F680, 0x1F6A4), (0x1F950, 0x1F96F), (0x1F980, 0x1F9A2)]


def emoji_names() -> list[tuple[str, str]]:
    """(character, name) pairs, names from the ``emoji`` package ("red apple")."""
    try:
        import emoji
    except ImportError:
        raise ValueError("the emoji dataset needs the 'emoji' package: pip install 'torchsd[train]'") from None
    pairs = []
    for start, end in EMOJI_RANGES:
        for code in range(start, end + 1):
            char = chr(code)
            if char in emoji.EMOJI_DATA and emoji.EMOJI_DATA[char].get("status") == emoji.STATUS["fully_qualified"]:
                name = emoji.EMOJI_DATA[char]["en"].strip(":").replace("_", " ").lower()
                pairs.append((char, name))
    return pairs


class EmojiDataset(Dataset):
    """A glyph rendered at 109 px (the font's bitmap size), scaled into the frame, on a random background."""

    def __init__(self, size: int = 64, length: int = 100_000, seed: int = 0, font_path: str = EMOJI_FONT):
        from PIL import ImageFont

        if not Path(font_path).exists():
            raise ValueError(f"the emoji dataset needs the Noto Color Emoji font at {font_path}; install it with: "
                             f"{EMOJI_INSTALL}")
        self.font = ImageFont.truetype(font_path, 109)
        self.names = emoji_names()
        self.size, self.length, self.seed = size, length, seed
        self._glyphs: dict[str, Image.Image] = {}

    def __len__(self) -> int:
        return self.length

    def glyph(self, char: str) -> Image.Image:
        if char not in self._glyphs:
            canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), char, font=self.font, embedded_color=True)
            self._glyphs[char] = canvas.crop(canvas.getbbox() or (0, 0, 136, 128))
        return self._glyphs[char]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        rng = random.Random(self.seed * 1_000_003 + index)
        char, name = self.names[rng.randrange(len(self.names))]
        background = rng.choice(list(COLORS))
        image = Image.new("RGB", (self.size, self.size), COLORS[background])
        glyph = self.glyph(char)
        target = int(self.size * 0.8)
        scale = target / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
        image.paste(glyph, ((self.size - glyph.width) // 2, (self.size - glyph.height) // 2), glyph)
        return pil_to_tensor(image)[0], f"{with_article(name)} on {with_article(background)} background"


# --- files -----------------------------------------------------------------------------------------

class FolderDataset(Dataset):
    """``img.png`` + ``img.txt`` pairs in a folder (recursively)."""

    def __init__(self, root: str | Path, size: int):
        root = Path(root)
        self.items = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.items:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.items[index]
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else ""
        with Image.open(path) as image:
            return square_crop(image, self.size), caption

    def geometry(self, index: int) -> Geometry:
        with Image.open(self.items[index]) as image:  # the header alone
            return crop_geometry(image.width, image.height, self.size)


class ManifestDataset(Dataset):
    """A JSONL (``{"image": path, "caption": text}`` per line) or CSV (columns image, caption) manifest;
    relative image paths are relative to the manifest."""

    def __init__(self, manifest: str | Path, size: int):
        manifest = Path(manifest)
        if manifest.suffix == ".csv":
            with open(manifest, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, row in enumerate(rows):
            if "image" not in row:
                raise ValueError(f"{manifest}: entry {i + 1} has no 'image' field")
        self.rows = [(manifest.parent / row["image"], row.get("caption", "")) for row in rows]
        self.size = size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.rows[index]
        with Image.open(path) as image:
            return square_crop(image, self.size), caption

    def geometry(self, index: int) -> Geometry:
        with Image.open(self.rows[index][0]) as image:
            return crop_geometry(image.width, image.height, self.size)


class TarShardDataset(Dataset):
    """WebDataset-style shards: members ``key.png``/``key.jpg`` + ``key.txt``. The shards are indexed
    once (names and offsets only) and read member by member, so they never need unpacking."""

    def __init__(self, shards: list[str | Path], size: int):
        self.index: list[tuple[Path, tarfile.TarInfo, tarfile.TarInfo | None]] = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, member in sorted(members.items()):
                stem, dot, suffix = name.rpartition(".")
                if dot and "." + suffix.lower() in IMAGE_SUFFIXES:
                    self.index.append((Path(shard), member, members.get(stem + ".txt")))
        if not self.index:
            raise ValueError(f"no image members found in shards {', '.join(map(str, shards))}")
        self.size = size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        shard, image_member, text_member = self.index[index]
        with tarfile.open(shard) as tar:
            data = tar.extractfile(image_member).read()
            caption = tar.extractfile(text_member).read().decode("utf-8").strip() if text_member else ""
        with Image.open(io.BytesIO(data)) as image:
            return square_crop(image, self.size), caption

    def geometry(self, index: int) -> Geometry:
        shard, image_member, _ = self.index[index]
        with tarfile.open(shard) as tar, Image.open(io.BytesIO(tar.extractfile(image_member).read())) as image:
            return crop_geometry(image.width, image.height, self.size)


def build_dataset(spec: str, size: int, seed: int = 0, length: int = 20000) -> Dataset:
    """``shapes``, ``scenes`` (shapes captioned in many phrasings, and two-object scenes), ``emoji``,
    ``shapes+emoji``, a folder, a .jsonl/.csv manifest, or shards ``a.tar,b.tar``
    (also a glob such as ``data/shard-*.tar``). Procedural datasets hold ``length`` items, split evenly
    between the parts of a ``+`` combination."""
    parts = spec.split("+")
    if len(parts) > 1:
        return ConcatDataset([build_dataset(p, size, seed, length // len(parts)) for p in parts])
    if spec == "shapes":
        return ShapesDataset(size, length=length, seed=seed)
    if spec == "emoji":
        return EmojiDataset(size, length=length, seed=seed)
    if spec == "scenes":
        return ScenesDataset(size, length=length, seed=seed)
    if spec.endswith(".tar") or ".tar," in spec or "*" in spec:
        import glob

        shards = sorted({p for pattern in spec.split(",") for p in glob.glob(pattern)})
        if not shards:
            raise ValueError(f"no tar shards match {spec!r}")
        return TarShardDataset(shards, size)
    path = Path(spec)
    if path.is_dir():
        return FolderDataset(path, size)
    if path.is_file() and path.suffix in (".jsonl", ".csv", ".json"):
        return ManifestDataset(path, size)
    raise ValueError(f"unknown dataset {spec!r}: use shapes, scenes, emoji, shapes+emoji, a folder of images with .txt "
                     f"captions, a .jsonl/.csv manifest, or .tar shards")


# --- control images (ControlNet training) -----------------------------------------------------------

def control_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1], as a ControlNet reads its hint (the pipeline's ``hint_tensor``)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ShapeMasks(Dataset):
    """The masks of ``ShapesDataset(size, length, seed)``, item for item."""

    def __init__(self, shapes: ShapesDataset, hint_size: int):
        self.shapes, self.hint_size = shapes, hint_size

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return control_tensor(self.shapes.mask(index), self.hint_size)


class ManifestControls(Dataset):
    """The ``control`` (or diffusers' ``conditioning_image``) column of a JSONL/CSV manifest, row for row."""

    def __init__(self, manifest: Path, hint_size: int):
        if manifest.suffix == ".csv":
            with open(manifest, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.paths = []
        for i, row in enumerate(rows):
            name = row.get("control") or row.get("conditioning_image")
            if not name:
                raise ValueError(f"{manifest}: entry {i + 1} has no 'control' (or 'conditioning_image') field: "
                                 f"ControlNet training needs a control image per item")
            self.paths.append(manifest.parent / name)
        self.hint_size = hint_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return control_tensor(image, self.hint_size)


def build_control_dataset(spec: str, size: int, hint_size: int, seed: int = 0, length: int = 20000) -> Dataset:
    """The control images of ``build_dataset(spec, size, seed, length)``, item for item: for ``shapes`` the
    shape's mask, for a manifest its ``control`` column; ``hint_size`` pixels square."""
    if spec == "shapes":
        return ShapeMasks(ShapesDataset(size, length=length, seed=seed), hint_size)
    path = Path(spec)
    if path.is_file() and path.suffix in (".jsonl", ".csv", ".json"):
        return ManifestControls(path, hint_size)
    raise ValueError(f"ControlNet training needs paired data: 'shapes' (the shape's mask is the control image) or "
                     f"a .jsonl/.csv manifest with image, control and caption fields; got {spec!r}")


def collate(batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    images, captions = zip(*batch)
    return torch.stack(images), list(captions)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
