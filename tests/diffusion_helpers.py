"""Fixtures shared by the diffusion tests (import them into a test module to use them)."""

from __future__ import annotations

import pytest

from sbora_diffusion.models import load_pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    """The embedded tiny pipeline, built once per module; tests that change it deep-copy it first."""
    return load_pipeline("tiny")
