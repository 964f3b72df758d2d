"""Safe by default: the key on every route, model names held inside --models-dir, sizes capped before work."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from serverutil import KEY, png_with_size, save_tiny
from torchsd.checkpoints import bundled_model_path
from torchsd.cli import main as cli_main
from torchsd.server.app import create_app
from torchsd.server.config import ServerConfig
from torchsd.server.schema import PayloadTooLarge, decode_image


def all_routes(models_dir) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, read from the app itself, plus static files and unknown paths."""
    app = create_app(ServerConfig(models_dir=models_dir, model=models_dir / "tiny-a"), preload=False)
    routes = [(method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations]
    routes += [("GET", path) for path in ("/", "/index.html", "/app.js", "/style.css", "/docs", "/openapi.json",
                                          "/no/such/path")]
    return routes


def test_every_route_refuses_requests_without_the_key(server, models_dir):
    routes = all_routes(models_dir)
    assert len(routes) >= 35
    assert ("POST", "/sdapi/v1/txt2img") in routes and ("POST", "/v1/images/generations") in routes
    wrong = [None, ("user", "wrong"), ("", ""), {"Authorization": "Bearer wrong"}, {"Authorization": f"Token {KEY}"},
             {"Authorization": f"Bearer {KEY}x"}]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in routes:
            for credentials in wrong:
                headers = credentials if isinstance(credentials, dict) else None
                auth = credentials if isinstance(credentials, tuple) else None
                response = client.request(method, path, json={"prompt": "x"}, headers=headers, auth=auth)
                assert response.status_code == 401, (method, path, credentials, response.text)
                assert "needs its API key" in response.text
                assert response.headers["WWW-Authenticate"].startswith("Bearer" if path.startswith("/v1/") else "Basic")


def test_the_key_works_as_bearer_and_as_basic_password(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("/sdapi/v1/options", "/v1/models", "/", "/app.js"):
            assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
            assert client.get(path, auth=("anyone", KEY)).status_code == 200
    assert b"<title>torchsd</title>" in httpx.get(f"{server.url}/", auth=("u", KEY)).content


def test_model_names_cannot_reach_outside_models_dir(server, models_dir):
    outside = save_tiny(models_dir.parent / "outside", seed=9)  # a loadable model, should traversal work
    link = models_dir / "link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with server.client() as client:
            assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
            titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
            assert titles == ["sub/tiny-b", "tiny-a"]  # the symlink out of the folder is not offered

            for name in ("../outside", "sub/../../outside", "..\\outside", str(outside), "~/outside",
                         "../outside [0123456789]", "C:\\models\\x"):
                response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
                assert response.status_code == 422, name
                assert "is refused: names are relative to --models-dir" in response.json()["detail"]
                response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                                                  "override_settings": {"sd_model_checkpoint": name}})
                assert response.status_code == 422, name
            response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "link"})
            assert response.status_code == 404 and "model 'link' not found" in response.json()["detail"]
            assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-a"

        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError, match="is refused"):
            oai.images.generate(prompt="x", model="../outside")
    finally:
        link.unlink()


def test_huge_png_is_refused_before_decoding(server):
    huge = base64.b64encode(png_with_size(20000, 20000)).decode()
    small = base64.b64encode(png_with_size(8, 8)).decode()
    rss_before = server.rss_mib()
    with server.client() as client:
        for path, body in (("/sdapi/v1/img2img", {"prompt": "x", "init_images": [huge]}),
                           ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [f"data:image/png;base64,{huge}"]}),
                           ("/sdapi/v1/png-info", {"image": huge})):
            response = client.post(path, json=body)
            assert response.status_code == 413, response.text
            # its pixel data is garbage: had the server started decoding, the error would say so instead
            assert ("is 20000x20000 (400000000 pixels), more than the limit of 16777216 pixels"
                    in response.json()["detail"])
        response = client.post("/sdapi/v1/png-info", json={"image": small})
        assert response.status_code == 422 and "could not be decoded" in response.json()["detail"]
    assert server.rss_mib() - rss_before < 100  # decoding 20000x20000 RGB would take 1.1 GiB


def test_decode_image_checks_the_header_first():
    data = base64.b64encode(png_with_size(5000, 5000)).decode()
    with pytest.raises(PayloadTooLarge, match="mask is 5000x5000"):
        decode_image(data, "mask", max_pixels=4096 * 4096)
    with pytest.raises(ValueError, match="not valid base64|not a readable"):
        decode_image("%%%%", "image", max_pixels=100)


def test_request_body_size_is_capped(server):
    big = {"prompt": "x" * (3 * 1024 * 1024)}
    with server.client() as client:
        response = client.post("/sdapi/v1/txt2img", json=big)
        assert response.status_code == 413 and "larger than this server's limit of 2 MiB" in response.json()["detail"]

        def chunks():  # no Content-Length: counted while it streams in
            for _ in range(48):
                yield b"x" * 65536

        response = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "limit of 2 MiB" in response.json()["detail"]
        assert client.get("/info").status_code == 200


def test_foreign_host_names_are_refused_on_loopback(server):
    """DNS rebinding: a web page that points its own name at 127.0.0.1 still sends that name as Host."""
    with server.client() as client:
        response = client.get("/sdapi/v1/options", headers={"Host": f"evil.example:{server.port}"})
        assert response.status_code == 421 and "answers only to 127.0.0.1 or localhost" in response.json()["detail"]
        assert client.get("/sdapi/v1/options", headers={"Host": f"localhost:{server.port}"}).status_code == 200


def test_bodies_must_be_json(server):
    """A form on another site can POST text/plain without asking; JSON needs the browser to ask first."""
    with server.client() as client:
        response = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
        assert response.status_code == 415 and "Content-Type: application/json" in response.json()["detail"]
        assert client.post("/sdapi/v1/interrupt").json() == {}  # an empty body needs no type (webuiapi sends none)


def test_binds_to_localhost_by_default(tmp_path):
    assert ServerConfig().host == "127.0.0.1" and ServerConfig().is_loopback
    from torchsd.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert not ServerConfig(host="0.0.0.0").is_loopback


def test_serve_refuses_bad_setups_with_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCHSD_API_KEY", raising=False)
    assert cli_main(["serve", "--models-dir", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["serve", "--models-dir", str(empty), "--api-key", " "]) == 2
    assert "the API key must not be empty" in capsys.readouterr().err
    assert cli_main(["serve", "--models-dir", str(empty), "--model", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    if not bundled_model_path().exists():  # with the bundled model installed, this would start serving it
        assert cli_main(["serve", "--models-dir", str(empty)]) == 2
        assert "no model to serve" in capsys.readouterr().err


def test_serve_loads_models_as_the_cli_does(tmp_path, monkeypatch):
    """``torchsd serve`` takes the runtime flags it lists (they were once parsed and dropped) and the CLI's
    default dtype, and applies them to every model it loads."""
    from types import SimpleNamespace

    import torch
    import uvicorn

    from torchsd.runtime import RuntimeOptions, default_dtype
    from torchsd.server import app as app_module
    from torchsd.server.registry import ModelRegistry

    seen = {}

    def fake_app(config):  # what ``run`` reads from the app before it serves
        seen["config"] = config
        current = SimpleNamespace(title="tiny")
        registry = SimpleNamespace(current=current)
        return SimpleNamespace(state=SimpleNamespace(torchsd=SimpleNamespace(registry=registry)))

    monkeypatch.setattr(app_module, "create_app", fake_app)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    save_tiny(tmp_path / "tiny", seed=0)
    assert cli_main(["serve", "--models-dir", str(tmp_path), "--channels-last", "--prepack",
                     "--attention-chunk", "64"]) == 0
    config = seen["config"]
    assert config.runtime == RuntimeOptions(channels_last=True, attention_chunk=64, prepack=True)
    assert ServerConfig().dtype_or_default == default_dtype("cpu")

    registry = ModelRegistry(tmp_path, device="cpu", dtype=torch.float32, runtime=config.runtime)
    sd = registry.pipeline()
    assert sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "prepack" in sd.sampling_hooks
    assert sd.unet.mid_block.attentions[0].transformer_blocks[0].attn1.attention_chunk == 64
