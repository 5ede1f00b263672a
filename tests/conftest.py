"""Shared fixtures: tiny random models and toy data built offline, once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GIST_MAP_AFTER_COMPUTE", "0")  # tests compute many runs: no background UMAP after each (tested on its own)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from gist_backend.devkit.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    from gist_backend.devkit.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    from gist_backend.devkit.tiny import make_toy_data

    return make_toy_data(tmp_path_factory.mktemp("toy"), n_train=60, n_val=12)
