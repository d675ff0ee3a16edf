"""Gaussian noise for the Gaussian mechanism: one sampling call per tensor per step.

Secure mode does two things (both needed for the DP guarantee to survive an adversary who sees
the released floating-point values):

* the generator is seeded from the operating system's CSPRNG (``secrets``), so the noise cannot
  be predicted or replayed from a known seed;
* the "resampling trick": a sample of ``N(0, s^2)`` is drawn as the sum of ``n = 2`` independent
  draws of ``N(0, s^2 / n)``.  Mironov (2012, "On significance of the least significant bits for
  differential privacy") showed that textbook floating-point samplers produce values whose low-order
  bits are not distributed like the real-valued noise, so ``value + noise`` can leak ``value``
  exactly.  Summing independent draws smears those artefacts over the whole lattice of floats,
  the mitigation Opacus adopted; the sum has exactly the requested variance.
"""

import math
import secrets
from typing import Dict, Optional

import torch

SECURE_RESAMPLING_DRAWS = 2

_secure_generators: Dict[str, torch.Generator] = {}


def secure_generator(device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` for ``device`` seeded from the OS CSPRNG (one per device, reused)."""
    key = str(torch.device(device))
    gen = _secure_generators.get(key)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(secrets.randbits(63))
        _secure_generators[key] = gen
    return gen


def gaussian_noise(
    std: float,
    reference: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    secure_mode: bool = False,
) -> torch.Tensor:
    """``N(0, std^2)`` noise shaped, typed and placed like ``reference``.

    ``std == 0`` gives exact zeros (no draw, so a deterministic run stays deterministic).
    ``secure_mode`` uses a CSPRNG-seeded generator and the resampling trick (module docstring);
    a user ``generator`` is refused there, since a known seed would make the noise removable.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return torch.zeros_like(reference)
    if secure_mode:
        if generator is not None:
            raise ValueError(
                "secure_mode=True draws noise from a CSPRNG-seeded generator; do not also pass "
                "`generator` (a known seed would make the noise predictable)"
            )
        n = SECURE_RESAMPLING_DRAWS
        draws = torch.normal(
            0.0,
            std / math.sqrt(n),
            size=(n, *reference.shape),
            generator=secure_generator(reference.device),
            device=reference.device,
            dtype=reference.dtype,
        )
        return draws.sum(dim=0)
    return torch.normal(
        0.0,
        std,
        size=reference.shape,
        generator=generator,
        device=reference.device,
        dtype=reference.dtype,
    )
