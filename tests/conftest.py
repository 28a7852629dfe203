"""Shared test set-up: one torch thread, and a private HOME so Ray's token files and caches of
one test run never collide with another's or with the user's."""

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_home():
    old = os.environ.get("HOME")
    with tempfile.TemporaryDirectory(prefix="gsnn-test-home-") as home:
        os.environ["HOME"] = home
        try:
            yield home
        finally:
            if old is not None:
                os.environ["HOME"] = old
