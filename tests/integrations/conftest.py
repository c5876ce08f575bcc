"""The tiny diffusers pipelines (tiny_pipelines.py) as fixtures, built once per test module (the tests that use
them skip without diffusers and transformers)."""

import pytest
import tiny_pipelines as tp


@pytest.fixture(scope="module")
def sd_pipe():
    return tp.stable_diffusion()


@pytest.fixture(scope="module")
def sd3_pipe():
    return tp.stable_diffusion_3()


@pytest.fixture(scope="module")
def flux_pipe():
    return tp.flux()
