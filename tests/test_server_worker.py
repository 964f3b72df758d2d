"""The worker on its own: bounded queue, interrupt within one step, skip, a crash that fails one job only."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from fastapi.testclient import TestClient

from reference import random_pipeline
from serverutil import KEY, one_thread, save_tiny
from torchsd import GenerationRequest
from torchsd.server.app import create_app
from torchsd.server.config import ServerConfig
from torchsd.server.jobs import run_generation
from torchsd.server.registry import ModelRegistry
from torchsd.server.schema import GenerationJob
from torchsd.server.worker import Interrupted, QueueFull, Worker


@pytest.fixture
def worker():
    w = Worker(queue_size=2)
    w.start()
    yield w
    w.stop()


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_queue_is_bounded_and_drains(worker):
    release = threading.Event()
    running = worker.submit("block", lambda control: release.wait(30))
    wait_until(lambda: worker.current is not None)
    waiting = [worker.submit(f"job {i}", lambda control, i=i: i) for i in range(2)]
    with pytest.raises(QueueFull, match="2 jobs are already waiting; retry in about") as err:
        worker.submit("one too many", lambda control: None)
    assert err.value.retry_after >= 1
    assert worker.job_count == 3
    release.set()
    assert running.result(30) is True and [f.result(30) for f in waiting] == [0, 1]
    assert worker.submit("again", lambda control: "ok").result(30) == "ok"  # room again once drained


def test_interrupt_stops_the_running_job_within_one_step(worker):
    seen = {}

    def job(control):
        seen["control"] = control
        for i in range(10_000):
            time.sleep(0.002)  # one "step"
            control.step(i, 10_000)
        return "finished"

    future = worker.submit("steps", job)
    wait_until(lambda: "control" in seen and seen["control"].steps_completed >= 5)
    assert worker.interrupt() is True
    with pytest.raises(Interrupted):
        future.result(30)
    control = seen["control"]
    assert control.steps_completed - control.interrupt_requested_at <= 1
    assert worker.interrupt() is False  # nothing runs any more


def test_a_crashed_job_fails_only_its_own_future(worker):
    def crash(control):
        raise RuntimeError("boom")

    failed = worker.submit("crash", crash)
    fine = worker.submit("fine", lambda control: 42)
    with pytest.raises(RuntimeError, match="boom"):
        failed.result(30)
    assert fine.result(30) == 42


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker-models")
    save_tiny(root / "tiny", seed=0)
    registry = ModelRegistry(root, root / "tiny")
    with one_thread():
        registry.pipeline()
    return registry


def test_skip_drops_one_batch_and_interrupt_ends_the_job(worker, registry):
    request = GenerationRequest("x", width=64, height=64, steps=20, seed=100, batch_size=2)
    job = GenerationJob(request, n_iter=3)

    def skip_then_interrupt():
        wait_until(lambda: worker.current is not None and worker.current.sampling_step >= 2)
        worker.skip()  # batch 1 stops early, batch 2 starts
        wait_until(lambda: worker.current.batch_index == 1 and worker.current.sampling_step >= 2)
        worker.interrupt()  # batch 2 stops early, batch 3 never starts

    helper = threading.Thread(target=skip_then_interrupt)
    helper.start()
    with one_thread():
        result = worker.submit("txt2img", lambda control: run_generation(job, registry, control)).result(120)
    helper.join(30)
    assert result.interrupted is True
    assert result.seeds == [100, 101, 102, 103]  # two partial batches, seeds continuing across batches
    assert len(result.images) == 4 and all(im.size == (64, 64) for im in result.images)
    assert 4 <= result.steps_completed < 40
    assert "Seed: 102," in result.infotexts[2]


def test_a_crash_in_a_request_fails_that_request_only(registry, monkeypatch, tmp_path):
    """Through HTTP (in-process app): the crashing request gets 500 and its message, the next one works."""
    sd = registry.pipeline()
    original = sd.run

    def run(request, **kwargs):
        if request.prompt == "crash":
            raise RuntimeError("the GPU caught fire")
        return original(request, **kwargs)

    monkeypatch.setattr(sd, "run", run)
    app = create_app(ServerConfig(api_key=KEY), registry=registry, preload=False)
    body = {"prompt": "crash", "width": 64, "height": 64, "steps": 2, "sampler_name": "DDIM"}
    with TestClient(app, base_url="http://127.0.0.1") as client, one_thread():
        client.auth = ("user", KEY)
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 500
        assert response.json()["detail"] == "RuntimeError: the GPU caught fire"
        assert client.post("/sdapi/v1/txt2img", json={**body, "prompt": "fine"}).status_code == 200
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_single_file_models_get_a1111_titles_with_their_hash(tmp_path):
    path = tmp_path / "models" / "sub" / "m.safetensors"
    path.parent.mkdir(parents=True)
    with one_thread():
        random_pipeline().save(path, format="single-file")
    registry = ModelRegistry(tmp_path / "models", path)
    entry = registry.current
    assert entry.title == "sub/m.safetensors" and entry.sha256 is None  # hashed when first loaded, as A1111 does
    with one_thread():
        sd = registry.pipeline()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry.sha256 == sha and entry.title == f"sub/m.safetensors [{sha[:10]}]" and entry.model_name == "sub_m"
    assert sd.model_hash == sha[:10] and sd.name == "sub_m"  # what the infotext says
    for name in (entry.title, "sub/m.safetensors", "sub/m", "sub_m", sha[:10], sha):
        assert registry.find(name) is entry
    assert entry.describe()["filename"] == str(path.resolve())
