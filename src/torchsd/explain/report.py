"""Figures for an ``Explanation`` (and the toy model), and writing them as one PNG or one HTML page.

matplotlib is an optional extra (``pip install 'torchsd[explain]'``); only this module imports it, and
only its object API (no pyplot, so no global figure state and no display backend).
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - depends on the installation
    raise ValueError("torchsd explain draws its figures with matplotlib; install it with "
                     "pip install 'torchsd[explain]' (or pip install matplotlib)") from None

from .trace import ControlRecord, Explanation

REPORT_SUFFIXES = (".png", ".html")
WIDTH_INCHES = 13.0
MAX_CHANNELS = 4  # latent channels drawn one by one (SD 3 and FLUX.1 have 16: the first four)
DPI = 90


@dataclass
class Section:
    """One stage of the report: a figure and the text that says what it shows."""

    name: str  # a file-name-friendly key, e.g. "forward-process"
    title: str
    caption: str
    figure: Figure


# --- drawing helpers ------------------------------------------------------------------------------

def _new_figure(rows: int, height_per_row: float = 2.3, width: float = WIDTH_INCHES) -> Figure:
    figure = Figure(figsize=(width, max(rows * height_per_row, 2.0)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return ((image.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _show_image(ax, image: torch.Tensor, title: str = "") -> None:
    ax.imshow(_rgb(image), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])


def _show_channel(ax, channel: torch.Tensor, title: str, limit: float | None = None):
    limit = limit or float(channel.abs().max()) or 1.0
    im = ax.imshow(channel.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    return im


def _label_row(ax, text: str) -> None:
    ax.set_ylabel(text, fontsize=9)


def figure_to_image(figure: Figure) -> Image.Image:
    figure.canvas.draw()
    return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy())


# --- the stages of a real generation --------------------------------------------------------------

def autoencoder_section(e: Explanation) -> Section | None:
    if e.init_image is None or e.init_latents is None:
        return None
    C = e.init_latents.shape[0]
    shown = min(C, MAX_CHANNELS)
    figure = _new_figure(1, 2.6)
    axes = figure.subplots(1, shown + 2)
    _show_image(axes[0], e.init_image, f"input {e.init_image.shape[2]}×{e.init_image.shape[1]}×3")
    limit = float(e.init_latents.abs().max())
    for c in range(shown):
        im = _show_channel(axes[c + 1], e.init_latents[c], f"latent channel {c}", limit)
    figure.colorbar(im, ax=axes[1:shown + 1], shrink=0.8)
    _show_image(axes[-1], e.decoded["reconstruction"], "decoded back")
    (H, W), (h, w) = e.init_image.shape[1:], e.init_latents.shape[1:]
    caption = (f"The VAE encoder turns the {W}×{H}×3 image into {w}×{h}×{C} latents "
               f"({3 * H * W / (C * h * w):.0f}× fewer numbers), scaled so that they have roughly unit "
               f"variance; every later stage works on them. The decoder maps them back to pixels.")
    return Section("autoencoder", "Autoencoder: image → latent space", caption, figure)


def forward_section(e: Explanation) -> Section:
    n = len(e.noising)
    figure = _new_figure(2)
    axes = figure.subplots(2, n, squeeze=False)
    limit = max(float(n.z[0].abs().max()) for n in e.noising)
    flow = e.model_kind == "flow"
    for j, n in enumerate(e.noising):
        title = (f"t = {n.timestep / 1000:.2f}   1 − t = {n.alpha_bar ** 0.5:.2f}" if flow else
                 f"t = {n.timestep}   √ᾱ = {n.alpha_bar ** 0.5:.2f}")
        _show_image(axes[0, j], e.decoded[f"noised/{n.timestep}"], title)
        _show_channel(axes[1, j], n.z[0], "latent channel 0", limit)
    _label_row(axes[0, 0], "decoded z_t")
    _label_row(axes[1, 0], "z_t (channel 0)")
    source = "the input image's" if e.init_latents is not None else "the generated image's"
    if flow:
        caption = (f"The forward process of rectified flow applied to {source} latents z0: a straight line to "
                   f"noise, z_t = (1 − t) z0 + t ε, one noise draw ε for all t. At t = 1 nothing of z0 is left: "
                   f"that pure noise is where generation starts, and the transformer predicts the velocity ε − z0 "
                   f"along the line.")
    else:
        caption = (f"The forward (noising) process applied to {source} latents z0: "
                   f"z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε, one noise draw ε for all t. By t = {e.noising[-1].timestep} "
                   f"almost nothing of z0 is left: that pure noise is where generation starts.")
    return Section("forward-process", "Forward process: noise dissolves the latent", caption, figure)


def denoising_section(e: Explanation) -> Section:
    shown = [i for i in range(len(e.steps)) if f"x0/{i}" in e.decoded]
    figure = _new_figure(2)
    axes = figure.subplots(2, max(len(shown), 1), squeeze=False)
    for j, i in enumerate(shown):
        step = e.steps[i]
        _show_image(axes[0, j], e.decoded[f"z/{i}"], f"step {i + 1}/{len(e.steps)}  σ→{step.sigma_next:.2f}")
        _show_image(axes[1, j], e.decoded[f"x0/{i}"], f"x0 at σ = {step.sigma:.2f}")
    _label_row(axes[0, 0], "sample x_t")
    _label_row(axes[1, 0], "predicted x0")
    net, what = ("transformer", "velocity") if e.model_kind == "flow" else ("U-Net", "noise")
    levels = "flow times σ = t, from 1 to 0" if e.model_kind == "flow" else "noise levels σ"
    caption = (f"The reverse process: {e.request.sampler} walks {len(e.steps)} steps down the {levels}. "
               f"At each step the {net}'s {what} prediction gives an estimate x0 of the clean latents (bottom); "
               f"the sampler moves the sample part of the way towards it (top). In a trained model the early x0 "
               f"are blurry averages of everything the prompt allows, and detail appears as σ falls.")
    return Section("denoising", f"Reverse process: the {net} denoises, step by step", caption, figure)


def attention_section(e: Explanation) -> Section:
    sizes = sorted(e.attention, key=lambda s: -s[0] * s[1])
    T = len(e.token_positions)
    figure = _new_figure(len(sizes), 1.45 + 0.1 * T / 2)
    axes = figure.subplots(len(sizes), T, squeeze=False)
    gray = _rgb(e.image).mean(axis=2)
    H, W = gray.shape
    for r, size in enumerate(sizes):
        maps = e.token_maps(size)
        share = e.attention[size][e.token_positions].mean(dim=(1, 2))  # of all attention at this size
        up = F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        for j in range(T):
            ax = axes[r, j]
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
            ax.imshow(up[j].numpy(), cmap="inferno", alpha=0.65, vmin=0, vmax=float(up[j].max()))
            ax.set_xticks([]), ax.set_yticks([])
            percent = 100 * float(share[j])
            ax.set_title(f"{e.tokens[j]}  {percent:.0f}%" if percent >= 10 else f"{e.tokens[j]}  {percent:.1f}%",
                         fontsize=9)
        _label_row(axes[r, 0], f"{size[1]}×{size[0]}, {len(e.attention_layers[size])} "
                               f"{'blocks' if e.model_kind == 'flow' else 'layers'}")
    if e.model_kind == "flow":
        caption = ("Joint attention: text and image tokens attend over their concatenation; shown is its "
                   "image-patch-query × text-key block, which does what cross-attention does in a U-Net. Each panel "
                   "is one token's attention over the patch grid (averaged over heads, joint blocks and sampler "
                   "steps; normalised to sum to one, brightest = most attended). The percentage is the token's "
                   "share of all of a patch's attention, image keys included. SD 3 reads CLIP's tokens and then "
                   "T5's, FLUX.1 T5's only.")
        return Section("cross-attention", "Joint attention: where each prompt token acts", caption, figure)
    caption = ("Cross-attention: every image position of the U-Net queries the prompt's tokens. Each panel is "
               "one token's attention over the image (averaged over heads, layers of that resolution and "
               "sampler steps; normalised to sum to one, brightest = most attended). The percentage is the "
               "token's share of all attention at that resolution — the start token usually absorbs most.")
    return Section("cross-attention", "Cross-attention: where each prompt token acts", caption, figure)


def guidance_section(e: Explanation) -> Section:
    scale = e.request.guidance_scale
    if not e.guidance:
        figure = _new_figure(1, 1.0)
        net = "transformer" if e.model_kind == "flow" else "U-Net"
        figure.text(0.5, 0.5, f"no guided {net} calls in this run", ha="center")
        return Section("guidance", "Classifier-free guidance",
                       "Not used here: with guidance scale 1 only the conditional prediction is made "
                       "(and image-to-image with strength 0 makes none).", figure)
    shown = [i for i in range(len(e.guidance)) if f"cond/{i}" in e.decoded]
    figure = _new_figure(len(shown), 2.4)
    grid = figure.add_gridspec(len(shown), 5)
    for r, i in enumerate(shown):
        g = e.guidance[i]
        for c, (key, title) in enumerate([("uncond", "x0 without prompt"), ("cond", "x0 with prompt")]):
            _show_image(figure.add_subplot(grid[r, c]), e.decoded[f"{key}/{i}"], f"{title}  σ = {g.sigma:.2f}")
        diff = (g.x0_cond - g.x0_uncond).norm(dim=0)
        ax = figure.add_subplot(grid[r, 2])
        ax.imshow(diff.numpy(), cmap="viridis")
        ax.set_title("|x0_cond − x0_uncond|", fontsize=9), ax.set_xticks([]), ax.set_yticks([])
    ax = figure.add_subplot(grid[:, 3:])
    sigmas = [g.sigma for g in e.guidance]
    rms = [float((g.x0_cond - g.x0_uncond).pow(2).mean().sqrt()) for g in e.guidance]
    ax.plot(sigmas, rms, "o-", label="rms(x0_cond − x0_uncond)")
    ax.plot(sigmas, [scale * v for v in rms], "s--", label=f"guidance push, × scale {scale:g}")
    ax.set_xscale("log"), ax.invert_xaxis()
    ax.set_xlabel("noise level σ (generation runs left to right)"), ax.legend(fontsize=8)
    caption = (f"Classifier-free guidance: the {'transformer' if e.model_kind == 'flow' else 'U-Net'} predicts x0 "
               f"twice per step, with the prompt and with the "
               f"negative (empty) prompt. The step uses x0_uncond + {scale:g} × (x0_cond − x0_uncond), "
               f"pushing {scale:g}× as far as the prompt alone would, towards what distinguishes it.")
    return Section("guidance", "Classifier-free guidance: with and without the prompt", caption, figure)


def _draw_control(figure: Figure, grid, row: int, record: ControlRecord, image: torch.Tensor) -> None:
    """Two rows of ``grid`` from ``row``: the mean |residual| per place (bars, over the calls) and per U-Net call
    (a heat map), then where they act at each resolution."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(record.maps):
        by_size.setdefault(tuple(m.shape), []).append(i)
    sizes = sorted(by_size, key=lambda hw: -hw[0] * hw[1])
    half = grid.ncols // 2
    what = "residual" if record.kind == "ControlNet" else "feature"
    ax = figure.add_subplot(grid[row, :half])
    overall = record.means.mean(dim=0)  # (residuals,) over the calls
    x = np.arange(len(record.labels))
    ax.bar(x, overall.numpy(), color=["#e8773a" if label == "mid" else "#3a7be8" for label in record.labels])
    ax.set_xticks(x, [f"{label}\n{record.maps[i].shape[1]}×{record.maps[i].shape[0]}"
                      for i, label in enumerate(record.labels)], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel(f"mean |{what}|", fontsize=9)
    where = "skip connection and the middle block" if record.kind == "ControlNet" else "place the U-Net adds it"
    ax.set_title(f"{record.kind}: per {where}, over all steps", fontsize=9)
    ax = figure.add_subplot(grid[row, half:])
    im = ax.imshow(record.means.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(x, record.labels, fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(len(record.timesteps)), [f"t={t:.0f}" for t in record.timesteps], fontsize=6)
    ax.set_title(f"{record.kind}: mean |{what}| at each U-Net call (top: first)", fontsize=9)
    figure.colorbar(im, ax=ax, shrink=0.8)
    gray = _rgb(image).mean(axis=2)
    H, W = gray.shape
    for j, size in enumerate(sizes):
        members = by_size[size]
        level_map = torch.stack([record.maps[i] for i in members]).mean(dim=0)
        up = F.interpolate(level_map[None, None], size=(H, W), mode="nearest")[0, 0]
        ax = figure.add_subplot(grid[row + 1, j])
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        ax.imshow(up.numpy(), cmap="inferno", alpha=0.65, vmin=0, vmax=float(up.max()) or 1.0)
        names = ", ".join(record.labels[i] for i in members)
        ax.set_title(f"{size[1]}×{size[0]}: {textwrap.shorten(names, 48)}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])


def control_section(e: Explanation) -> Section | None:
    """What the control units added to the U-Net: a ControlNet's residuals per skip connection and middle block,
    a T2I-Adapter's features per level (and SDXL's middle block); their size per step and where they act."""
    records = [r for r in (e.control, e.adapter) if r is not None]
    if not records:
        return None
    columns = max(2, *(len({tuple(m.shape) for m in r.maps}) for r in records))
    figure = _new_figure(2 * len(records), 2.6)
    grid = figure.add_gridspec(2 * len(records), columns)
    for k, record in enumerate(records):
        _draw_control(figure, grid, 2 * k, record, e.image)
    parts = []
    if e.control is not None:
        units = ", ".join(e.control.units)
        parts.append(
            f"ControlNet{': ' + units if units else ''}. A ControlNet is a copy of the U-Net's encoder that also "
            f"reads the control image; through zero-initialised 1×1 convolutions it adds a residual to each of "
            f"the U-Net's skip connections and to its middle block's output.")
    if e.adapter is not None:
        units = ", ".join(e.adapter.units)
        parts.append(
            f"T2I-Adapter{': ' + units if units else ''}. A T2I-Adapter is a small network from the control image "
            f"alone (no timestep, no text) to one feature map per U-Net level, computed once; each is added to the "
            f"U-Net's own activations where the labels say (a level's last block, or its output after the "
            f"downsampler; SDXL's last one to the middle block), so it changes everything the U-Net computes "
            f"after that point. Its size varies over the calls only where start and end switch it on and off.")
    parts.append("Top: the mean magnitude (over channels and positions, the prompt's row, times the unit's weight) "
                 "per place, and per U-Net call. Bottom: where they act, per resolution (mean over channels, "
                 "calls and the places of that size).")
    kinds = " and ".join(r.kind for r in records)
    title = {"ControlNet": "ControlNet: the residuals added to the U-Net, level by level",
             "T2I-Adapter": "T2I-Adapter: the features added to the U-Net, level by level"}.get(
        kinds, f"{kinds}: what they add to the U-Net, level by level")
    return Section("control", title, " ".join(parts), figure)


def decoder_section(e: Explanation) -> Section:
    latents = e.latents
    C = latents.shape[0]
    shown = min(C, MAX_CHANNELS)
    figure = _new_figure(1, 2.6)
    axes = figure.subplots(1, shown + 1)
    limit = float(latents.abs().max())
    for c in range(shown):
        im = _show_channel(axes[c], latents[c], f"final latent channel {c}", limit)
    figure.colorbar(im, ax=axes[:shown], shrink=0.8)
    _show_image(axes[-1], e.image, "decoded image")
    caption = "The last latents, after the final step, go through the VAE decoder once: that is the image."
    if shown < C:
        caption += f" (The first {shown} of the {C} latent channels are shown.)"
    return Section("decoder", "Reconstruction: the decoder turns latents into the image", caption, figure)


def explanation_sections(e: Explanation) -> list[Section]:
    sections = [autoencoder_section(e), forward_section(e), denoising_section(e), attention_section(e),
                control_section(e), guidance_section(e), decoder_section(e)]
    return [s for s in sections if s is not None]


# --- writing ---------------------------------------------------------------------------------------

def check_report_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise ValueError(f"the report is written as PNG or HTML: the output path must end in .png or .html; "
                         f"got {str(path)!r}")
    return path


def _titled(section: Section) -> Image.Image:
    caption = "\n".join(textwrap.wrap(section.caption, 150))
    section.figure.suptitle(f"{section.title}\n{caption}", fontsize=10, ha="center")
    image = figure_to_image(section.figure)
    section.figure.suptitle("")
    return image


def write_report(sections: list[Section], path: str | Path, heading: str) -> Path:
    """One tall PNG (sections stacked, captions in the titles) or one self-contained HTML page."""
    path = check_report_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        images = [_titled(s) for s in sections]
        width = max(i.width for i in images)
        sheet = Image.new("RGB", (width, sum(i.height for i in images)), "white")
        y = 0
        for image in images:
            sheet.paste(image, ((width - image.width) // 2, y))
            y += image.height
        sheet.save(path)
        return path
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(heading)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%}</style>",
             f"<h1>{html.escape(heading)}</h1>"]
    for s in sections:
        buffer = io.BytesIO()
        figure_to_image(s.figure).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append(f"<h2>{html.escape(s.title)}</h2><p>{html.escape(s.caption)}</p>"
                     f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{data}'>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def save_figures(sections: list[Section], folder: str | Path, prefix: str = "") -> list[Path]:
    """Each section's figure as its own PNG (for the guide): ``folder/<prefix><name>.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in sections:
        paths.append(folder / f"{prefix}{s.name}.png")
        figure_to_image(s.figure).save(paths[-1], optimize=True)
    return paths
