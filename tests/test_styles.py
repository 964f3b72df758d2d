"""Prompt styles from AUTOMATIC1111's styles.csv: the merge rules, the file, and the styles option through
Python, the CLI, the real webuiapi client against a live server, and the OpenAI route."""

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from reference import random_pipeline
from serverutil import KEY, Server, one_thread
from torchsd import GenerationRequest, load_pipeline
from torchsd.cli import main
from torchsd.pipeline.infotext import read_png_infotext, request_fields
from torchsd.server.registry import ModelRegistry
from torchsd.text.styles import StyleLibrary, merge_prompts, read_styles_csv

STYLES_CSV = '''name,prompt,negative_prompt
Ink,"ink drawing of {prompt}, black and white","colour, photo"
Moody,"dark, moody lighting",blurry
"Empty",,
'''


@pytest.fixture
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(STYLES_CSV, encoding="utf-8")
    return path


# --- the merge rules and the file ---------------------------------------------------------------------------

def test_merge_prompts_as_a1111():
    assert merge_prompts("ink drawing of {prompt}, bw", "a cat") == "ink drawing of a cat, bw"
    assert merge_prompts("dark, moody", "a cat ") == "a cat, dark, moody"
    assert merge_prompts("dark", "") == "dark"
    assert merge_prompts("", "a cat") == "a cat"
    assert merge_prompts("  ", "  a cat  ") == "a cat"


def test_styles_apply_in_order_to_both_prompts(styles_file):
    library = StyleLibrary(styles_file)
    assert library.apply(["Ink", "Moody"], "a cat", "ugly") == (
        "ink drawing of a cat, black and white, dark, moody lighting", "ugly, colour, photo, blurry")
    assert library.apply(["Moody", "Ink"], "a cat", "") == (
        "ink drawing of a cat, dark, moody lighting, black and white", "blurry, colour, photo")
    assert library.apply(["Empty"], "a cat", "") == ("a cat", "")
    assert library.as_list()[0] == {"name": "Ink", "prompt": "ink drawing of {prompt}, black and white",
                                    "negative_prompt": "colour, photo"}


def test_unknown_styles_and_bad_files_are_named(styles_file, tmp_path):
    with pytest.raises(ValueError, match=r"unknown prompt style 'Nope'; .*styles.csv has: 'Ink', 'Moody', 'Empty'"):
        StyleLibrary(styles_file).check(["Ink", "Nope"])
    with pytest.raises(ValueError, match="no styles file is loaded"):
        StyleLibrary().check(["Ink"])
    with pytest.raises(ValueError, match="does not exist"):
        read_styles_csv(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("title,words\na,b\n")
    with pytest.raises(ValueError, match="needs the columns name, prompt, negative_prompt"):
        read_styles_csv(tmp_path / "bad.csv")
    (tmp_path / "old.csv").write_text("name,text\nOld,old style\n")  # A1111's older column name
    assert read_styles_csv(tmp_path / "old.csv")["Old"].prompt == "old style"


# --- Python and the CLI -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


def test_python_styles_equal_the_expanded_prompt(sd, styles_file):
    sd.styles.load(styles_file)
    base = dict(steps=2, seed=4, width=16, height=16)
    styled = sd.generate("a [red:blue:1] cat", negative_prompt="ugly", styles=["Ink", "Moody"], **base)
    expanded = "ink drawing of a [red:blue:1] cat, black and white, dark, moody lighting"
    plain = sd.generate(expanded, negative_prompt="ugly, colour, photo, blurry", **base)
    assert torch.equal(styled.latents, plain.latents)
    # the infotext holds the prompts with the styles applied, as A1111 writes them, and reproduces the run
    assert styled.infotexts[0] == plain.infotexts[0]
    assert styled.infotexts[0].startswith(expanded + "\nNegative prompt: ugly, colour, photo, blurry\n")
    assert torch.equal(sd.generate(**request_fields(styled.infotexts[0])).latents, styled.latents)
    with pytest.raises(ValueError, match="unknown prompt style 'Nope'"):
        sd.generate("a cat", styles=["Nope"], **base)
    with pytest.raises(ValueError, match="styles must be a list of style names"):
        GenerationRequest("a cat", styles="Ink")


def test_cli_style_flags(sd, styles_file, tmp_path, monkeypatch):
    sd.save(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--device", "cpu", "--steps", "2", "--size", "16x16", "--seed",
              "3"]
    assert main(["generate", "a cat", "--style", "Ink", "--style", "Moody", "--styles-file", str(styles_file),
                 "--output", str(tmp_path / "a.png"), *common]) == 0
    info = read_png_infotext(tmp_path / "a.png")
    assert info.startswith("ink drawing of a cat, black and white, dark, moody lighting\n"
                           "Negative prompt: colour, photo, blurry\n")
    # without --styles-file: styles.csv in the current folder
    monkeypatch.chdir(styles_file.parent)
    assert main(["generate", "a cat", "--style", "Ink", "--style", "Moody", "--output", str(tmp_path / "b.png"),
                 *common]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    # --from reproduces it without the styles
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "c.png"),
                 "--model", str(tmp_path / "model"), "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))


def test_cli_unknown_style_fails_with_its_name(sd, styles_file, tmp_path, capsys):
    sd.save(tmp_path / "model")
    assert main(["generate", "a cat", "--style", "Nope", "--styles-file", str(styles_file), "--model",
                 str(tmp_path / "model"), "--device", "cpu", "--steps", "1", "--size", "16x16",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert "unknown prompt style 'Nope'" in capsys.readouterr().err


# --- the server ---------------------------------------------------------------------------------------------

def test_registry_reads_models_dir_styles_csv(tmp_path, styles_file, models_dir):
    assert ModelRegistry(models_dir, models_dir / "tiny-a").styles.styles == {}  # none in the shared folder
    registry = ModelRegistry(models_dir, models_dir / "tiny-a", styles_file=styles_file)
    assert list(registry.styles.styles) == ["Ink", "Moody", "Empty"]
    # <models-dir>/styles.csv when no --styles-file is given (styles_file's folder as the models folder)
    registry = ModelRegistry(styles_file.parent, models_dir / "tiny-a")
    assert registry.styles.path == styles_file.resolve() and "Ink" in registry.styles.styles
    assert registry.pipeline().styles is registry.styles  # what the runs read


@pytest.fixture(scope="module")
def styled_server(models_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("styles") / "my-styles.csv"
    path.write_text(STYLES_CSV, encoding="utf-8")
    instance = Server(models_dir, "--model", str(models_dir / "tiny-a"), "--dtype", "fp32", "--styles-file",
                      str(path))
    yield instance
    instance.stop()


def test_webuiapi_styles_against_the_live_server(styled_server, models_dir):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=styled_server.port, sampler="DDIM", steps=3, username="user",
                            password=KEY)
    assert api.get_prompt_styles() == [{"name": "Ink", "prompt": "ink drawing of {prompt}, black and white",
                       "negative_prompt": "colour, photo"},
                      {"name": "Moody", "prompt": "dark, moody lighting", "negative_prompt": "blurry"},
                      {"name": "Empty", "prompt": "", "negative_prompt": ""}]
    result = api.txt2img(prompt="a [red:blue:2] cat", negative_prompt="ugly", styles=["Ink", "Moody"], width=64,
                         height=64, seed=12, cfg_scale=7.0)
    local = load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)
    with one_thread():
        expected = local.generate("ink drawing of a [red:blue:2] cat, black and white, dark, moody lighting",
                                  negative_prompt="ugly, colour, photo, blurry", width=64, height=64, steps=3,
                                  sampler="ddim", eta=1.0, guidance_scale=7.0, seed=12)
    assert [im.info["parameters"] for im in result.images] == expected.infotexts
    diff = np.abs(np.asarray(result.images[0], np.int16) - np.asarray(expected.images[0], np.int16)).max()
    assert diff <= 1
    assert result.info["styles"] == ["Ink", "Moody"]
    with styled_server.client() as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "styles": ["Nope"], "steps": 1,
                                                          "width": 64, "height": 64})
        assert response.status_code == 422 and "unknown prompt style 'Nope'" in response.text
        response = client.post("/v1/images/generations", json={"prompt": "a cat", "styles": ["Nope"], "steps": 1,
                                                                "size": "64x64"})
        assert response.status_code == 422 and "unknown prompt style 'Nope'" in response.text


def test_server_without_a_styles_file_refuses_styles_by_name(server):
    with server.client() as client:
        assert client.get("/sdapi/v1/prompt-styles").json() == []
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "styles": ["Ink"], "steps": 1,
                                                          "width": 64, "height": 64})
    assert response.status_code == 422
    assert "unknown prompt style 'Ink'" in response.text and "--styles-file" in response.text
