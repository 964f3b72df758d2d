"""Load on the real server: rounds of N concurrent txt2img requests against a bounded queue.

Prints, per round, how many requests completed and how many were refused with 503, the latencies of
both, and the server's resident memory after the round. Uses a tiny random model (no weights needed).

    PYTHONPATH=src python benchmarks/server_load.py --requests 50 --queue 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from serverutil import KEY, Server, fire, save_tiny  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="torchsd-load-"))
    save_tiny(root / "models" / "tiny", seed=0)
    server = Server(root / "models", "--queue-size", str(args.queue), key=KEY)
    body = {"prompt": "load", "width": args.size, "height": args.size, "steps": args.steps, "sampler_name": "DDIM"}
    try:
        with server.client() as client:
            client.post("/sdapi/v1/txt2img", json=body).raise_for_status()  # warm-up
        print(f"{args.requests} concurrent requests per round, queue {args.queue}, {args.steps} steps at "
              f"{args.size}x{args.size}; server RSS after warm-up {server.rss_mib():.1f} MiB")
        print("round  completed  refused(503)  other  wall s  completed p50/max s  refused max s  RSS MiB")
        for round_number in range(1, args.rounds + 1):
            start = time.monotonic()
            results = fire(server, "/sdapi/v1/txt2img", body, args.requests)
            wall = time.monotonic() - start
            done = [t for r, t in results if getattr(r, "status_code", None) == 200]
            busy = [t for r, t in results if getattr(r, "status_code", None) == 503]
            other = len(results) - len(done) - len(busy)
            print(f"{round_number:5d}  {len(done):9d}  {len(busy):12d}  {other:5d}  {wall:6.2f}  "
                  f"{statistics.median(done):8.2f}/{max(done):<8.2f}     {max(busy) if busy else 0:10.3f}  "
                  f"{server.rss_mib():7.1f}")
        with server.client() as client:
            alive = client.get("/info").status_code == 200
        print(f"server still answering: {alive and server.alive()}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
