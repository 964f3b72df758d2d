import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")

# the server fixtures live here so that one server (a session fixture) serves all test_server_* files
import torch  # noqa: E402

from serverutil import models_dir, server  # noqa: E402,F401

# Tiny test models gain nothing from threads, and on a busy shared machine threads waiting for each
# other at every op made a test 40x slower (measured). TORCHSD_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TORCHSD_TEST_THREADS", "1")))
