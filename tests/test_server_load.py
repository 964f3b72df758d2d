"""A bounded load test: 50 concurrent requests against a queue of 8 on localhost.

Every request is either completed (200) or refused at once (503 with Retry-After); the server stays up
and its memory is flat from one round to the next. ``benchmarks/server_load.py`` prints the figures.
"""

from __future__ import annotations

from collections import Counter

from serverutil import KEY, Server, fire, save_tiny

BODY = {"prompt": "load", "width": 64, "height": 64, "steps": 1, "cfg_scale": 1.0, "sampler_name": "DDIM"}


def test_fifty_concurrent_requests_against_a_queue_of_eight(tmp_path):
    save_tiny(tmp_path / "models" / "tiny", seed=0)
    server = Server(tmp_path / "models", "--queue-size", "8", key=KEY)
    try:
        with server.client() as client:
            assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 200  # warm-up
        rss = [server.rss_mib()]
        for _ in range(3):
            results = fire(server, "/sdapi/v1/txt2img", BODY, 50)
            statuses = Counter(getattr(r, "status_code", type(r).__name__) for r, _ in results)
            assert set(statuses) <= {200, 503}, statuses
            assert statuses[200] >= 9, statuses  # the running job and the 8 waiting ones always fit
            for response, _ in results:
                if response.status_code == 503:
                    assert int(response.headers["Retry-After"]) >= 1
                    assert "8 jobs are already waiting" in response.json()["detail"]
                else:
                    assert len(response.json()["images"]) == 1
            assert server.alive()
            rss.append(server.rss_mib())
            print(f"completed {statuses[200]}, refused {statuses[503]}, RSS {rss[-1]:.0f} MiB")
        with server.client() as client:
            assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
            assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 200
        assert rss[-1] - rss[1] < 64, f"RSS grew from round to round: {rss} MiB"
    finally:
        server.stop()
