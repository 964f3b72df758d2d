"""``torchsd generate --prompts FILE``: parsing, batching that keeps the images, resume after a kill,
and sharding across torchrun ranks with every image written exactly once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from reference import max_rel_error, pixels, random_pipeline
from torchsd.cli import main
from torchsd.pipeline import GenerationRequest
from torchsd.pipeline.batch import batches, generate_batch, read_prompts
from torchsd.pipeline.infotext import parse_infotext, read_png_infotext

SRC = str(Path(__file__).resolve().parents[1] / "src")
DEFAULTS = GenerationRequest(prompt="", steps=3, width=32, height=32)
LONG = ", ".join(f"word{i}" for i in range(60))  # more than one 75-token chunk


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "tiny"
    random_pipeline("sd1").save(path)
    return path


def write(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_lines_and_json_lines_become_jobs(tmp_path):
    path = write(tmp_path, 'a cat\n\n# a comment\n{"prompt": "a dog", "steps": 5, "count": 2}\n'
                           '{"prompt": "a bird", "seed": 40, "output": "bird.png", "negative_prompt": "blur"}\n')
    jobs = read_prompts(path, DEFAULTS, tmp_path / "out", first_seed=10)
    assert [j.request.prompt for j in jobs] == ["a cat", "a dog", "a dog", "a bird"]
    assert [j.output.name for j in jobs] == ["00000.png", "00001.png", "00002.png", "bird.png"]
    assert [j.request.seed for j in jobs] == [10, 11, 12, 40]
    assert [j.request.steps for j in jobs] == [3, 5, 5, 3]
    assert jobs[3].request.negative_prompt == "blur"
    assert [[j.output.name for j in b] for b in batches(jobs, 4)] == [["00000.png", "bird.png"],
                                                                    ["00001.png", "00002.png"]]
    assert [len(b) for b in batches(jobs, 1)] == [1, 1, 1, 1]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "x", "stpes": 3}\n', r"prompts.txt:1: unknown keys stpes; valid keys: prompt"),
    ('ok\n{"prompt": "x", "width": 500}\n', r"prompts.txt:2: width must be a multiple of 8"),
    ('{"prompt": 3}\n', r'needs a "prompt" string'),
    ('{"prompt": "x",}\n', "not valid JSON"),
    ('{"prompt": "x", "count": 0}\n', "count must be an integer between 1"),
    ('{"prompt": "x", "output": "../escape.png"}\n', "plain file name ending in .png"),
    ('{"prompt": "x", "output": "a.png"}\n{"prompt": "y", "output": "a.png"}\n', "is used twice"),
    ("\n# only comments\n", "holds no prompts"),
])
def test_bad_prompt_files_are_refused_with_the_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_prompts(write(tmp_path, text), DEFAULTS, tmp_path)


def test_cli_refuses_a_missing_file_and_a_png_output(tmp_path, capsys, model_dir):
    assert main(["generate", "--prompts", str(tmp_path / "none.txt"), "--model", str(model_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = write(tmp_path, "a cat\n")
    assert main(["generate", "--prompts", str(path), "-o", str(tmp_path / "x.png"), "--model", str(model_dir)]) == 2
    assert "--output is a folder" in capsys.readouterr().err
    assert main(["generate", "a cat", "--prompts", str(path), "--model", str(model_dir)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert "give a PROMPT" in capsys.readouterr().err


def test_a_batch_of_different_prompts_equals_each_alone():
    sd = random_pipeline("sd1")
    requests = [DEFAULTS.replace(prompt=p, negative_prompt=n, seed=s)
                for p, n, s in (("a cat", "", 1), ("a red dog on grass", "blurry", 7), ("x", "", 3),
                                (LONG, "", 4), ("(a cat:1.3) on a [mat]", "", 5))]
    images, infotexts = generate_batch(sd, requests)
    for request, image, infotext in zip(requests, images, infotexts):
        alone = sd.generate(request)
        assert infotext == alone.infotexts[0]
        a = pixels(image)
        b = pixels(alone.images[0])
        assert (a - b).abs().max() <= 1  # batched matmuls round differently: at most one 8-bit level


@pytest.mark.parametrize("sampler, scheduler", [("ddim", "automatic"), ("euler_a", "automatic"),
                                                ("DPM++ 2M SDE Heun", "karras")])
def test_batched_latents_match_to_float32_tolerance(sampler, scheduler):
    from torchsd.pipeline import batch as batch_module

    sd = random_pipeline("sd1")
    captured = []
    original = sd.decode_latents
    sd.decode_latents = lambda latents: captured.append(latents) or original(latents)
    requests = [DEFAULTS.replace(prompt=p, seed=s, sampler=sampler, scheduler=scheduler)
                for p, s in (("a cat", 1), ("a dog", 2))]
    batch_module.generate_batch(sd, requests)
    for k, request in enumerate(requests):
        assert max_rel_error(captured[0][k], sd.generate(request).latents[0]) < 1e-4


def test_requests_the_pipeline_must_run_alone_are_not_batched(tmp_path):
    path = write(tmp_path, 'a cat\n<lora:style:0.5> a dog\na bird\n')
    jobs = read_prompts(path, DEFAULTS, tmp_path, first_seed=0)
    assert [[j.output.name for j in b] for b in batches(jobs, 8)] == [["00000.png", "00002.png"], ["00001.png"]]
    hires = read_prompts(write(tmp_path, "a\nb\n"), DEFAULTS.replace(hires=True), tmp_path, first_seed=0)
    assert [len(b) for b in batches(hires, 8)] == [1, 1]


def test_mixed_shapes_are_refused_by_generate_batch():
    sd = random_pipeline("sd1")
    with pytest.raises(ValueError, match="same shape"):
        generate_batch(sd, [DEFAULTS.replace(seed=1), DEFAULTS.replace(seed=2, steps=4)])


def test_cli_run_writes_every_image_and_skips_existing(tmp_path, model_dir, capsys):
    path = write(tmp_path, 'a cat\na dog\n{"prompt": "a bird", "steps": 2}\n')
    out = tmp_path / "out"
    args = ["generate", "--prompts", str(path), "--model", str(model_dir), "--steps", "3", "--size", "32x32",
            "--seed", "5", "-o", str(out), "--max-batch", "2"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    info = parse_infotext(read_png_infotext(out / "00002.png"))
    assert info["prompt"] == "a bird" and info["Seed"] == "7" and info["Steps"] == "2"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "00001.png").unlink()
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 images in" in printed and "2 of 3 already existed" in printed
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "00001.png"} == \
        {k: v for k, v in stamps.items() if k != "00001.png"}
    assert parse_infotext(read_png_infotext(out / "00001.png"))["Seed"] == "6"


def _env():
    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def _png_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png")) if folder.exists() else []


def test_two_gloo_ranks_write_every_image_exactly_once(tmp_path, model_dir):
    n = 7
    path = write(tmp_path, "".join(f"prompt number {i}\n" for i in range(n)))
    out = tmp_path / "out"
    # one already there: it must be neither redone nor counted as missing
    out.mkdir()
    (out / "00003.png").write_bytes(b"kept")
    logs = tmp_path / "logs"
    # each rank's output to its own file: two processes writing one pipe can interleave within a line
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3",
           "-m", "torchsd", "generate", "--prompts", str(path), "--model", str(model_dir), "--steps", "2",
           "--size", "32x32", "--seed", "0", "-o", str(out), "--max-batch", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    rank_outputs = {p.parent.name: p.read_text() for p in logs.rglob("stdout.log")}
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(p.read_text() for p in logs.rglob("stderr.log"))
    assert sorted(rank_outputs) == ["0", "1"]
    assert _png_names(out) == [f"{i:05d}.png" for i in range(n)]
    assert (out / "00003.png").read_bytes() == b"kept"
    written = [line.split()[0] for text in rank_outputs.values() for line in text.splitlines()
               if line.endswith(")") and ".png" in line]
    assert sorted(Path(w).name for w in written) == [f"{i:05d}.png" for i in range(n) if i != 3]  # once each
    assert "[rank 0/2]" in rank_outputs["0"] and "[rank 1/2]" in rank_outputs["1"]
    seeds = {Path(w).name: int(parse_infotext(read_png_infotext(w))["Seed"]) for w in written}
    assert seeds == {f"{i:05d}.png": i for i in range(n) if i != 3}


def test_a_killed_run_restarts_where_it_stopped(tmp_path, model_dir):
    n = 6
    path = write(tmp_path, "".join(f"prompt number {i}\n" for i in range(n)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchsd", "generate", "--prompts", str(path), "--model", str(model_dir),
           "--steps", "12", "--size", "32x32", "--seed", "0", "-o", str(out), "--max-batch", "1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_png_names(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert 2 <= len(before) < n, "the run finished before it could be killed; make it slower"
    for png in out.glob("*.png"):  # a kill mid-write leaves at most a hidden .tmp, never a broken PNG
        Image.open(png).verify()

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _png_names(out) == [f"{i:05d}.png" for i in range(n)]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert {k: after[k] for k in before} == before  # what existed was not redone
    assert f"{n - len(before)} images in" in done.stdout and f"{len(before)} of {n} already existed" in done.stdout
