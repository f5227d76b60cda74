"""Shared fixtures: tiny random-init pipelines built in code (no download), and their folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from consistent_diffusion.core.cpu_kernels import pin_cpu_kernels  # noqa: E402

# The kernels the bench pins, before the first computation: a bench run inside this process must
# give the numbers its command-line runs (fresh processes, pinned) give.
pin_cpu_kernels()

# Tiny models run fastest on one thread (thread start-up dominates their kernels); it also keeps
# the suite quick on 2-core machines where a background job shares the CPU.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    from consistent_diffusion.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", kind="sd")


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    from consistent_diffusion.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", kind="sdxl")


@pytest.fixture
def tiny_sd():
    from consistent_diffusion.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture
def tiny_sdxl():
    from consistent_diffusion.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()
