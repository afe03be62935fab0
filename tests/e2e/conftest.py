"""Fixtures shared by the end-to-end tests."""

import pytest

MAX_TOKENS = 64


@pytest.fixture(scope="module")
def greedy():
    """Greedy sampling for the lossless comparisons (64 tokens: long answers end, some run on)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
