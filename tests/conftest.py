"""Shared test set-up: one torch thread, a private HOME so Ray's token files and caches of one
test run never collide with another's or with the user's, and the C kernels required: with
GSNN_NATIVE=1 a missing compiler fails the suite instead of testing only the torch fallback
(subprocesses and Ray actors inherit it). Tests that compare the two paths switch to torch with
``gsnn.native.torch_only()``."""

import os
import tempfile

os.environ.setdefault("GSNN_NATIVE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Run the test twice: on the C kernels (which must build here), then with every kernel on
    its torch twin (``gsnn.native.torch_only``, the GPU and no-compiler path)."""
    from gsnn import kernels, native

    if request.param == "native":
        assert kernels.library() is not None, "GSNN_NATIVE=1: the C kernels must build"
        yield "native"
    else:
        with native.torch_only():
            yield "torch"
