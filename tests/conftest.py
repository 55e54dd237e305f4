import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# the autotuner's persistent cache: one per test session, never the user's ~/.cache/slimline
os.environ.setdefault("SLIMLINE_CACHE_DIR", tempfile.mkdtemp(prefix="slimline-test-cache-"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
