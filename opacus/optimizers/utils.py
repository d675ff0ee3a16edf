"""Helpers shared by the DP optimizers."""

from typing import List

import torch.nn as nn
from torch.optim import Optimizer


def params(optimizer: Optimizer) -> List[nn.Parameter]:
    """The parameters of ``optimizer`` (every param group, in order) that require gradients.

    Args:
        optimizer: the optimizer.

    Returns:
        the parameters, in order.
    """
    ret = []
    for param_group in optimizer.param_groups:
        ret += [p for p in param_group["params"] if p.requires_grad]
    return ret
