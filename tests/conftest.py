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


@pytest.fixture
def finish_job():
    """Wait for a dashboard background job (`jobs.launch`) of a run to end, and check that it completed."""

    def wait(run_dir, kind: str, timeout: float = 300) -> None:
        import time

        from dashboard import jobs

        deadline = time.time() + timeout
        while jobs.job_status(run_dir, kind).state == "running":
            assert time.time() < deadline, jobs.log_tail(run_dir, kind)
            time.sleep(1)
        assert jobs.job_status(run_dir, kind).state == "complete", jobs.log_tail(run_dir, kind)

    return wait

