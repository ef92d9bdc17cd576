"""Test-wide settings: one torch thread per process, as every service runs in CI."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
