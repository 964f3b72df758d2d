"""The models the server can switch between, and the LoRA and embedding files beside them.

Clients name a model by its title (``sub/model.safetensors [0123456789]``), its file name or its model
name. A name is only ever looked up in the list scanned from ``--models-dir``, never joined onto a
path, so no name reaches outside the folder; ``..`` and absolute paths are refused with a message, and
symlinks that lead out of the folder are left out of the list.
"""

from __future__ import annotations

import gc
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints.io import file_sha256
from ..checkpoints.upscalers import UpscalerLibrary
from ..runtime import RuntimeOptions, load_pipeline
from ..text.styles import StyleLibrary

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".gguf")  # .gguf: quantized FLUX.1 / SD 3.5 transformers
ADDON_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
LORA_FOLDER, EMBEDDINGS_FOLDER, UPSCALER_FOLDER, TAESD_FOLDER = "Lora", "embeddings", "ESRGAN", "VAE-taesd"
STYLES_FILE = "styles.csv"
# folders of other kinds of weights, never offered as models
SIDE_FOLDERS = {LORA_FOLDER.lower(), EMBEDDINGS_FOLDER.lower(), "vae", "controlnet", "hypernetworks", "esrgan",
                TAESD_FOLDER.lower(), "text_encoder", "text_encoders", "clip"}  # the last three: SD 3 / FLUX.1 parts
MAX_DEPTH = 4


class ModelNotFound(LookupError):
    pass


@dataclass
class ModelEntry:
    path: Path  # resolved
    relpath: str  # relative to --models-dir with '/' separators (or the file name for a model given by path)
    sha256: str | None = None  # known once the model has been loaded (hashing a 4 GB file takes seconds)

    @property
    def model_name(self) -> str:
        """A1111's model_name: the relative path without its extension, separators as '_'."""
        stem = self.relpath[: -len(self.path.suffix)] if self.path.is_file() else self.relpath
        return stem.replace("/", "_")

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.relpath} [{self.short_hash}]" if self.sha256 else self.relpath

    def names(self) -> set[str]:
        names = {self.title, self.relpath, self.model_name, self.path.name}
        if self.path.is_file():
            names.add(self.relpath[: -len(self.path.suffix)])
        if self.sha256:
            names |= {self.sha256, self.sha256[:10]}
        return names

    @property
    def family(self) -> str | None:
        """"sd1", "sd2", "sdxl", "sd3" or "flux", read from the folder's or file's names (None: not known)."""
        if not hasattr(self, "_family"):
            self._family = model_family(self.path)
        return self._family

    def describe(self) -> dict:
        """The /sd-models item (``family``: torchsd's addition, for the web page's model picker)."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash, "sha256": self.sha256,
                "filename": str(self.path), "config": None, "family": self.family}


def model_family(path: Path) -> str | None:
    """The model family of a checkpoint, from model_index.json or the file's tensor names (headers only)."""
    import json

    from ..checkpoints.flow_pipeline import flow_family, tensor_names

    flow = flow_family(path)
    if flow is not None:
        return flow
    if path.is_dir():
        try:
            name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
            text = json.loads((path / "text_encoder" / "config.json").read_text())
        except (OSError, ValueError, AttributeError):
            return None
        return "sdxl" if "XL" in name else "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    names = tensor_names(path)
    if not names:
        return None
    if any(n.startswith("conditioner.embedders.") for n in names):
        return "sdxl"
    return "sd2" if any(n.startswith("cond_stage_model.model.") for n in names) else "sd1"


def check_model_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a model name must be a non-empty string; got {name!r}. "
                         f"Pick a title from /sdapi/v1/sd-models")
    bare = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$", "", name.strip())
    parts = re.split(r"[\\/]", bare)
    if ".." in parts or bare.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", bare) or "\x00" in bare:
        raise ValueError(f"model name {name!r} is refused: names are relative to --models-dir, and '..' or "
                         f"absolute paths cannot be used. Pick a title from /sdapi/v1/sd-models")
    return name.strip()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def scan_models(root: Path) -> list[ModelEntry]:
    """Single-file checkpoints and diffusers folders under ``root``, sorted by relative path."""
    root = root.resolve()
    found: list[ModelEntry] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return
        for child in children:
            if child.name.startswith(".") or not _inside(child, root):
                continue  # hidden, or a symlink that leads out of --models-dir
            rel = child.relative_to(root).as_posix()
            if child.is_dir():
                if (child / "model_index.json").is_file():
                    found.append(ModelEntry(child.resolve(), rel))
                elif depth < MAX_DEPTH and child.name.lower() not in SIDE_FOLDERS:
                    visit(child, depth + 1)
            elif child.suffix.lower() in CHECKPOINT_SUFFIXES and child.is_file():
                found.append(ModelEntry(child.resolve(), rel))

    visit(root, 0)
    return found


class ModelRegistry:
    """The model list, the loaded pipelines (least recently used first out) and the current model.

    ``load``/``select`` run on the worker thread only, so a switch never races a generation."""

    def __init__(self, models_dir: Path | None, default: Path | None = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_loaded: int = 1, vae: Path | None = None,
                 variant: str | None = None, runtime: RuntimeOptions | None = None, styles_file: Path | None = None,
                 taesd: Path | None = None, fast_decode: bool = False):
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        if styles_file is None and self.models_dir is not None and (self.models_dir / STYLES_FILE).is_file():
            styles_file = self.models_dir / STYLES_FILE
        self.styles = StyleLibrary(styles_file)  # every loaded model's ``sd.styles``
        self.device, self.dtype, self.max_loaded = device, dtype, max_loaded
        self.runtime = runtime  # RuntimeOptions applied to every model loaded (None: the defaults)
        self.vae = vae  # the operator's VAE swap (--vae), for every model
        self.variant = variant  # the weights variant of folder models (--variant)
        if taesd is None and self.models_dir is not None and (self.models_dir / TAESD_FOLDER).is_dir():
            taesd = self.models_dir / TAESD_FOLDER  # as A1111 keeps its TAESD files
        if fast_decode and taesd is None:
            raise ValueError(f"--fast-decode decodes with TAESD: give --taesd PATH or put the files in "
                             f"<models-dir>/{TAESD_FOLDER}")
        self.taesd, self.fast_decode = taesd, fast_decode  # previews (and with fast_decode, final images)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._loaded: OrderedDict[Path, object] = OrderedDict()
        self._extra: list[ModelEntry] = []
        self.entries: list[ModelEntry] = []
        # ESRGAN-family networks by file stem, as A1111 lists <models-dir>/ESRGAN; shared by every loaded model
        self.upscalers = UpscalerLibrary()
        if self.models_dir is not None and (self.models_dir / UPSCALER_FOLDER).is_dir():
            self.upscalers.add_dir(self.models_dir / UPSCALER_FOLDER)
        self.refresh()
        self.current = self._default_entry(default)

    # --- the list ------------------------------------------------------------------------------
    def refresh(self) -> list[ModelEntry]:
        previous = {e.path: e for e in self.entries}  # keep the objects, so ``current`` stays in the list
        entries = [previous.get(e.path, e) for e in scan_models(self.models_dir)] if self.models_dir else []
        listed = {e.path for e in entries}
        entries += [e for e in self._extra if e.path not in listed]
        for entry in entries:
            entry.sha256 = self._hashes.get(self._hash_key(entry.path))
        self.entries = entries
        return entries

    def _default_entry(self, default: Path | None) -> ModelEntry:
        from ..checkpoints import bundled_model_path

        if default is None:
            bundled = bundled_model_path()
            if bundled.exists():
                default = bundled
            elif self.entries:
                return self.entries[0]
            else:
                where = f"no model was found in {self.models_dir}" if self.models_dir else "no --models-dir was given"
                raise ValueError(f"no model to serve: the bundled model {bundled.name} is not installed and "
                                 f"{where}; pass --model PATH or --models-dir DIR")
        path = Path(default).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"--model {str(default)!r}: no such file or folder")
        for entry in self.entries:
            if entry.path == path:
                return entry
        entry = ModelEntry(path, path.name)  # given by the operator, so it may live anywhere
        self._extra.append(entry)
        self.entries.append(entry)
        return entry

    def find(self, name: str) -> ModelEntry:
        name = check_model_name(name)
        for matches in (lambda e: name in e.names(), lambda e: name.lower() in {n.lower() for n in e.names()}):
            for entry in self.entries:
                if matches(entry):
                    return entry
        titles = ", ".join(repr(e.title) for e in self.entries[:20]) or "none"
        raise ModelNotFound(f"model {name!r} not found; available: {titles} (after adding files, POST "
                            f"/sdapi/v1/refresh-checkpoints)")

    # --- loading (worker thread) -------------------------------------------------------------------
    def load(self, entry: ModelEntry):
        if entry.path in self._loaded:
            self._loaded.move_to_end(entry.path)
            return self._loaded[entry.path]
        while len(self._loaded) >= self.max_loaded:
            self._loaded.popitem(last=False)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        options = {"vae": self.vae} if self.vae is not None else {}
        if self.variant is not None and entry.path.is_dir():  # a single file has no variants
            options["variant"] = self.variant
        if self.models_dir is not None:  # <lora:name:w> in prompts and embeddings by name, as A1111 finds them
            options["lora_dirs"] = [p for p in [self.models_dir / LORA_FOLDER] if p.is_dir()]
            options["embedding_dirs"] = [p for p in [self.models_dir / EMBEDDINGS_FOLDER] if p.is_dir()]
        # as the CLI and torchsd.load_pipeline load: the same defaults (runtime.py)
        sd = load_pipeline(entry.path, self.device, self.dtype, runtime=self.runtime, taesd=self.taesd,
                           fast_decode=self.fast_decode, **options)
        sd.name = entry.model_name
        sd.model_loader = self.load_second  # a refiner that a request names: looked up in the list, by name
        sd.styles = self.styles
        sd.upscalers = self.upscalers
        if self.models_dir is not None:  # ControlNet models by name, as the A1111 extension finds them
            from ..pipeline.features.control import control_models

            control_models(sd).add_dir(self.models_dir / "ControlNet")
        if entry.path.is_file() and entry.sha256 is None:
            key = self._hash_key(entry.path)
            if key not in self._hashes:  # hashing reads the whole file: once per (path, mtime, size)
                self._hashes[key] = file_sha256(entry.path)
            entry.sha256 = self._hashes[key]
        self._loaded[entry.path] = sd
        return sd

    def load_second(self, name: str):
        """A second model that a request names (SDXL's refiner), found in the list by name as ``find`` finds
        it and loaded as models are; it stays with the model that asked for it (``sd.refiners``), outside
        the list of loaded models, so loading it never unloads the first."""
        entry = self.find(name)
        options = {"variant": self.variant} if self.variant is not None and entry.path.is_dir() else {}
        return load_pipeline(entry.path, self.device, self.dtype, runtime=self.runtime, **options)

    def select(self, entry: ModelEntry):
        sd = self.load(entry)
        self.current = entry
        return sd

    def pipeline(self):
        return self.load(self.current)

    def loaded(self, entry: ModelEntry):
        """The pipeline if it is in memory, else None (never loads: safe from any thread)."""
        return self._loaded.get(entry.path)

    @staticmethod
    def _hash_key(path: Path) -> tuple[str, int, int]:
        try:
            st = path.stat()
        except OSError:
            return (str(path), -1, -1)
        return (str(path), st.st_size, st.st_mtime_ns)

    # --- LoRAs and embeddings ------------------------------------------------------------------------
    def _addon_files(self, folder: str) -> list[Path]:
        if self.models_dir is None:
            return []
        base = self.models_dir / folder
        if not base.is_dir():
            return []
        files = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.suffix.lower() in ADDON_SUFFIXES and _inside(path, self.models_dir):
                    files.append(path)
        return files

    def loras(self) -> list[dict]:
        from ..checkpoints.io import safetensors_metadata

        items = []
        for path in self._addon_files(LORA_FOLDER):
            try:
                metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
            except Exception:  # an unreadable file is still listed; using it will report the error
                metadata = {}
            items.append({"name": path.stem, "alias": path.stem, "path": str(path), "metadata": metadata})
        return items

    def embeddings(self, text_width: int | None) -> dict:
        """A1111's shape: {"loaded": {name: item}, "skipped": {name: item}}; skipped = other text width."""
        loaded, skipped = {}, {}
        for path in self._addon_files(EMBEDDINGS_FOLDER):
            item = describe_embedding(path)
            (loaded if item["shape"] and item["shape"] == text_width else skipped)[path.stem] = item
        return {"loaded": loaded, "skipped": skipped}


def describe_embedding(path: Path) -> dict:
    """Vectors and width of a textual-inversion file (A1111 .pt, .safetensors, diffusers .bin)."""
    item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0, "vectors": 0}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                key = "emb_params" if "emb_params" in keys else keys[0]
                shape = f.get_slice(key).get_shape()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
                tensor = next(iter(obj["string_to_param"].values()))
                item.update({k: obj.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")
                             if isinstance(obj.get(k), (int, str))})
            elif isinstance(obj, dict):
                tensor = next(v for v in obj.values() if isinstance(v, torch.Tensor))
            else:
                tensor = obj
            shape = list(tensor.shape)
    except Exception:  # unreadable or not an embedding: listed as skipped with shape 0
        return item
    item["shape"] = int(shape[-1]) if shape else 0
    item["vectors"] = int(shape[0]) if len(shape) > 1 else 1
    return item
