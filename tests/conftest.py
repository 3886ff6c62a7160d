"""Shared test setup: Triton runs in its interpreter on CPU, and fixtures for the tiny and real models."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
