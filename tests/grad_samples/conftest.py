"""Fixtures shared by the grad-sampler suites."""

import pytest

from opacus.grad_sample.conv import clear_conv_strategy_cache, set_conv_strategy


@pytest.fixture
def auto_conv_strategy():
    """Start and end in the default convolution strategy ("auto") with an empty choice cache."""
    set_conv_strategy("auto")
    clear_conv_strategy_cache()
    yield
    set_conv_strategy("auto")
    clear_conv_strategy_cache()
