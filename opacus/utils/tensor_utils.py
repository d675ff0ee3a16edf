"""Tensor helpers of the grad samplers, at their Opacus 1.6 path.

The code lives in ``opacus.grad_sample.tensor_utils``, beside its users (the grad samplers).
"""

from opacus.grad_sample.tensor_utils import (  # noqa: F401 (re-exports)
    calc_sample_norms,
    calc_sample_norms_one_layer,
    explicit_padding,
    filter_dilated_rows,
    sum_over_all_but_batch_and_last_n,
    unfold2d,
    unfold3d,
)

__all__ = [
    "calc_sample_norms",
    "calc_sample_norms_one_layer",
    "explicit_padding",
    "filter_dilated_rows",
    "sum_over_all_but_batch_and_last_n",
    "unfold2d",
    "unfold3d",
]
