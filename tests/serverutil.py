"""Test helpers for the server: tiny random models in a models folder, and the real server in a subprocess."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from reference import random_pipeline

KEY = "test-key-123"
SRC = str(Path(__file__).resolve().parent.parent / "src")


def save_tiny(path: Path, seed: int) -> Path:
    with one_thread():
        random_pipeline(seed=seed).save(path)
    return path


def build_models_dir(root: Path) -> Path:
    """tiny-a/ and sub/tiny-b/ (diffusers folders), a LoRA file, two embeddings (one of another width) and an
    ESRGAN-family upscaler."""
    models = root / "models"
    save_tiny(models / "tiny-a", seed=0)
    save_tiny(models / "sub" / "tiny-b", seed=3)
    (models / "Lora").mkdir()
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(models / "Lora" / "style.safetensors"),
              metadata={"ss_network_dim": "4"})
    (models / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(2, 64)}, "name": "tok", "step": 100},
               models / "embeddings" / "tok.pt")
    save_file({"emb_params": torch.zeros(3, 768)}, str(models / "embeddings" / "sd15only.safetensors"))
    (models / "ESRGAN").mkdir()
    torch.save({"params_ema": tiny_compact_upscaler(seed=0)}, models / "ESRGAN" / "R-ESRGAN 4x+.pth")
    return models


def build_flow_models_dir(work: Path, *, schnell: bool = False, fill: bool = False) -> Path:
    """tiny-sd/ (SD 1), flux-dev/ and sd35/ (tiny SD 3.5 and FLUX.1-dev diffusers folders written by diffusers),
    a FLUX.1 LoRA for flux-dev's weights, with ``schnell`` flux-schnell/ (no guidance embedding) and with
    ``fill`` flux-fill/ (FLUX.1 Fill)."""
    import flow_reference as ref  # diffusers: imported only by the tests that build flow models

    models = work / "models"
    save_tiny(models / "tiny-sd", seed=0)
    with one_thread():
        ref.saved(ref.flux_pipeline(work), models / "flux-dev")
        ref.saved(ref.sd3_pipeline(work), models / "sd35")
        ref.save_lora(ref.flux_pipeline(work), models / "Lora", "flux_style.safetensors")  # for flux-dev's weights
        if schnell:
            ref.saved(ref.flux_pipeline(work, dev=False, seed=5), models / "flux-schnell")
        if fill:
            ref.saved(ref.fill_pipeline(work), models / "flux-fill")
    return models


def tiny_compact_upscaler(seed: int, features: int = 8, convs: int = 1, scale: int = 4) -> dict:
    """Random weights in Real-ESRGAN's SRVGGNetCompact layout (body.0 conv, body.1 PReLU, …, last conv to
    3·scale² channels), written from the layout itself rather than from torchsd's module."""
    gen = torch.Generator().manual_seed(seed)
    state, n = {}, 0
    for cin, cout in [(3, features)] + [(features, features)] * convs + [(features, 3 * scale ** 2)]:
        state[f"body.{n}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (1 / (cin * 9)) ** 0.5
        state[f"body.{n}.bias"] = torch.randn(cout, generator=gen) * 0.01
        if cout != 3 * scale ** 2:
            state[f"body.{n + 1}.weight"] = torch.full((cout,), 0.25) + 0.05 * torch.randn(cout, generator=gen)
        n += 2
    return state


@contextmanager
def one_thread():
    """Run in-process torch work on one thread: on a shared, loaded machine two threads can be 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is garbage: decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")


def image_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Server:
    """``python -m torchsd serve`` in a subprocess on a free localhost port."""

    def __init__(self, models_dir: Path, *args: str, key: str | None = KEY, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log_path = log or models_dir.parent / f"server-{self.port}.log"
        command = [sys.executable, "-m", "torchsd", "serve", "--models-dir", str(models_dir), "--port",
                   str(self.port), "--log-level", "warning", *args]
        if key:
            command += ["--api-key", key]
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1"}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    @property
    def auth(self):
        return ("user", self.key) if self.key else None

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=120, **kwargs)

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/info", auth=self.auth, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return build_models_dir(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="session")
def server(models_dir):
    """One server for the API, security and web page tests: key set, 2 MiB body limit, max side 512, and
    float32, whose results do not depend on the thread count (the tests compare with in-process runs)."""
    instance = Server(models_dir, "--model", str(models_dir / "tiny-a"), "--max-body-mb", "2", "--max-side", "512",
                      "--max-steps", "150", "--dtype", "fp32")
    yield instance
    instance.stop()


def fire(server: Server, path: str, body: dict, count: int) -> list[tuple[httpx.Response | Exception, float]]:
    """``count`` requests released at the same instant, one connection each: (response or error, seconds)."""
    import threading

    barrier = threading.Barrier(count)
    results: list = [None] * count

    def one(i: int) -> None:
        with server.client() as client:
            barrier.wait()
            start = time.monotonic()
            try:
                response = client.post(path, json=body)
            except httpx.HTTPError as err:
                response = err
            results[i] = (response, time.monotonic() - start)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
