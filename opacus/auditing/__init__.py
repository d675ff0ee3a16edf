"""Empirical privacy auditing: statistical lower bounds on the eps that DP-SGD really achieves.

An accountant's eps is an upper bound only if the implementation is right (per-sample gradients
not mixed across samples, every sample clipped, noise of the right scale). An audit measures how
well an adversary can tell whether a canary was in the training data and turns that into
``eps_lower``, which holds with the stated confidence; ``eps_lower > eps_claimed`` proves a bug.

* :mod:`opacus.auditing.bounds`: the statistics (Clopper--Pearson, hypothesis-test bound,
  Steinke et al. 2023 one-run bound); no torch.
* :mod:`opacus.auditing.canary`: Dirac gradient canaries and the canary parameter wrapper.
* :mod:`opacus.auditing.dp_sgd`: the white-box audits of ``PrivacyEngine`` runs: gradient
  canaries (``audit_dp_sgd``, many runs; ``audit_dp_sgd_one_run``, Steinke et al. 2023) and a
  crafted input canary (``audit_dp_sgd_input_canary``), which also exercises the grad samplers.

Deliberately broken DP-SGD variants, for checking that an audit catches privacy bugs, are not
shipped in the package: see ``examples/sabotage.py`` (used by ``examples/audit_dp_sgd.py``).

Example:
    >>> import torch
    >>> from opacus.auditing import audit_dp_sgd
    >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    >>> result = audit_dp_sgd(lambda: torch.nn.Linear(4, 2), (x, y),
    ...                       dict(noise_multiplier=2.0, max_grad_norm=1.0),
    ...                       trials=2000, canaries_per_run=100)  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
"""

from opacus.auditing.bounds import (
    OneRunAudit,
    ThresholdAudit,
    clopper_pearson,
    eps_from_error_rates,
    eps_lower_from_counts,
    eps_lower_from_scores,
    one_run_eps_lower,
    one_run_eps_lower_from_scores,
    one_run_tail_bound,
)
from opacus.auditing.canary import CanaryModule, dirac_canary_gradients, insert_canary_gradients
from opacus.auditing.dp_sgd import (
    AuditResult,
    audit_dp_sgd,
    audit_dp_sgd_input_canary,
    audit_dp_sgd_one_run,
    run_canary_experiment,
)

__all__ = [
    "AuditResult",
    "CanaryModule",
    "OneRunAudit",
    "ThresholdAudit",
    "audit_dp_sgd",
    "audit_dp_sgd_input_canary",
    "audit_dp_sgd_one_run",
    "clopper_pearson",
    "dirac_canary_gradients",
    "eps_from_error_rates",
    "eps_lower_from_counts",
    "eps_lower_from_scores",
    "insert_canary_gradients",
    "one_run_eps_lower",
    "one_run_eps_lower_from_scores",
    "one_run_tail_bound",
    "run_canary_experiment",
]
