"""Shared fixtures: tiny random-init pipelines built in code (no download), and their folders."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
