"""Gaussian noise for the Gaussian mechanism.

A step noises every parameter tensor.  On an accelerator (and in secure mode) the whole step's
noise of one device and dtype is drawn in one sampling call (``with_gaussian_noise``): there each
call costs a kernel launch (or a system call) whatever its size, and the caching allocator makes
one flat buffer free.  On the CPU each tensor otherwise keeps its own call: measured there, one
flat draw was slower (1.63 vs 1.15 ms for 300 tensors of 64 elements; 10.2 vs 9.5 ms for
4 x 768^2), its buffer fresh memory from the OS at every step, and the noise is best added while
it is still in cache.

Secure mode (``secure_mode=True``) protects the noise against an adversary who sees the released
floating-point values and knows everything else (the strong adversary of the DP definition):

* **A cryptographically secure source.**  torch's generators (Mersenne Twister on the CPU,
  Philox on CUDA) are statistical generators: their state can be reconstructed from enough
  outputs (624 32-bit outputs for the Mersenne Twister), and an adversary who knows every sample
  but one can subtract the known clipped sum from a released update and read the noise off it.
  Seeding them from ``secrets`` hides the seed but not the state.  Secure mode therefore draws
  its uniforms from the operating system's CSPRNG (``os.urandom``: ``getrandom(2)``, ChaCha20 on
  Linux) and turns them into normals with the Box-Muller transform in float64 (53 random bits per
  uniform), on the CPU, then casts and moves the result to the parameter's device
  (``csprng_standard_normal``).  Cost, measured on one core of a shared CPU: 60 to 115 ns per
  normal draw (``os.urandom`` at 260 to 450 MB/s, 8 bytes per draw, plus the transform), against
  12 ns for torch's ``randn``; with the four draws per coordinate below, a secure step spends
  about 0.25 s per million parameters on noise (0.01 s without secure mode), plus the
  host-to-device copy on an accelerator.
* **The floating-point countermeasure** (Holohan and Braghin 2021, "Secure random sampling in
  differential privacy", after Mironov 2012, "On significance of the least significant bits for
  differential privacy"): a textbook floating-point sampler does not produce every float near a
  value with the right probability, so ``value + noise`` can reveal ``value``.  A sample of
  ``N(0, s^2)`` is therefore drawn as ``(X_1 + X_2 + X_3 + X_4) / 2`` with independent
  ``X_k ~ N(0, s^2)`` (``n = 2``: the sum of ``2n`` draws divided by ``n``, variance ``s^2``),
  after one scalar draw that is discarded (so that the noise of consecutive calls does not start
  at a position an observer can predict).

What secure mode does not cover: the Poisson sampling of batches, which the data loader draws with
a torch generator (``secure_generator``: seeded from ``secrets``, but not a CSPRNG), timing side
channels, and anyone who can read the process's memory.
"""

import math
import os
import secrets
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

# Holohan-Braghin resampling: a secure draw is the sum of 2n draws divided by n.
SECURE_RESAMPLING_N = 2
# Kept for compatibility: the number of draws is 2 * SECURE_RESAMPLING_N.
SECURE_RESAMPLING_DRAWS = 2 * SECURE_RESAMPLING_N

_secure_generators: Dict[str, torch.Generator] = {}

_MANTISSA_BITS = 53
_MANTISSA_MASK = (1 << _MANTISSA_BITS) - 1


def secure_generator(device: torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` for ``device`` seeded from the OS CSPRNG (one per device, reused).

    For *sampling* (e.g. the Poisson data loader in secure mode): the seed is unpredictable, but
    the generator itself is torch's (Mersenne Twister / Philox), not a CSPRNG.  Noise in secure
    mode does not use it (module docstring).
    """
    key = str(torch.device(device))
    gen = _secure_generators.get(key)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(secrets.randbits(63))
        _secure_generators[key] = gen
    return gen


def _csprng_uniforms(count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` float64 uniforms in ``(0, 1]`` and ``count`` in ``[0, 1)`` from ``os.urandom``."""
    raw = torch.frombuffer(bytearray(os.urandom(16 * count)), dtype=torch.int64)
    # The top 53 bits of each 64-bit word (masked after the arithmetic shift): k / 2^53.
    u = ((raw >> (64 - _MANTISSA_BITS)) & _MANTISSA_MASK).to(torch.float64)
    u.mul_(2.0**-_MANTISSA_BITS)
    u1, u2 = u[:count], u[count:]
    u1 = torch.add(u1, 2.0**-_MANTISSA_BITS)  # (0, 1]: log(u1) is finite
    return u1, u2


def csprng_standard_normal(
    shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device="cpu"
) -> torch.Tensor:
    """Standard normal draws from the OS CSPRNG (Box-Muller in float64), cast to ``dtype`` and
    moved to ``device``."""
    shape = tuple(shape)
    numel = math.prod(shape)
    pairs = (numel + 1) // 2
    u1, u2 = _csprng_uniforms(pairs)
    radius = torch.log(u1).mul_(-2.0).sqrt_()
    angle = u2.mul_(2.0 * math.pi)
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:numel]
    return z.view(shape).to(device=device, dtype=dtype)


def _normal_draw(
    std: float,
    shape: Sequence[int],
    *,
    generator: Optional[torch.Generator],
    device: torch.device,
    dtype: torch.dtype,
    secure: bool,
) -> torch.Tensor:
    """One draw of ``N(0, std^2)`` of ``shape``: the single sampler every path goes through."""
    if secure:
        return csprng_standard_normal(shape, dtype=dtype, device=device).mul_(std)
    return torch.normal(
        0.0, std, size=tuple(shape), generator=generator, device=device, dtype=dtype
    )


def gaussian_noise(
    std: float,
    reference: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    secure_mode: bool = False,
) -> torch.Tensor:
    """``N(0, std^2)`` noise shaped, typed and placed like ``reference``.

    ``std == 0`` gives exact zeros and draws nothing (a deterministic run stays deterministic, a
    generator's state is untouched).  Without secure mode: one draw with ``generator``.
    ``secure_mode``: one discarded scalar draw, then ``(X_1 + ... + X_4) / 2`` from the OS CSPRNG
    (module docstring); a user ``generator`` is refused there, since a known seed would make the
    noise removable.
    """
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    if std == 0:
        return torch.zeros_like(reference)
    kwargs = dict(generator=generator, device=reference.device, dtype=reference.dtype)
    if not secure_mode:
        return _normal_draw(std, reference.shape, secure=False, **kwargs)
    if generator is not None:
        raise ValueError(
            "secure_mode=True draws noise from the OS CSPRNG; do not also pass `generator` "
            "(a known seed would make the noise predictable)"
        )
    _normal_draw(std, (), secure=True, **kwargs)  # discarded (Holohan and Braghin 2021)
    total = _normal_draw(std, reference.shape, secure=True, **kwargs)
    for _ in range(2 * SECURE_RESAMPLING_N - 1):
        total.add_(_normal_draw(std, reference.shape, secure=True, **kwargs))
    return total.div_(SECURE_RESAMPLING_N)


def with_gaussian_noise(
    std: float,
    tensors: Sequence[torch.Tensor],
    *,
    generator: Optional[torch.Generator] = None,
    secure_mode: bool = False,
    one_call_per_device: Optional[bool] = None,
    divisor: Optional[float] = None,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(i, tensors[i] + N(0, std^2))`` for every ``i``, as new tensors, the noise drawn as
    by ``gaussian_noise``.  Linear in the number of tensors.

    ``one_call_per_device``: draw the noise of all tensors of one device and dtype in one call
    (their results are views into one buffer) instead of one call per tensor; by default, on
    accelerators and in secure mode (module docstring).

    ``divisor``: yield ``(tensors[i] + N(0, std^2)) / divisor`` instead (``scale_grad`` fused
    in).  Without secure mode that is drawn as ``N(0, (std / divisor)^2) + tensors[i] *
    (1 / divisor)``: the same random draws scaled by ``std / divisor``, one pass over each tensor
    fewer.  Bit for bit the same as dividing afterwards when ``divisor`` is a power of two
    (scaling by one is exact); otherwise the two roundings differ by about an ulp.  Secure mode
    draws ``N(0, std^2)`` as always and divides the sum (its resampling is defined for ``std``).
    """
    if divisor is not None and not (math.isfinite(divisor) and divisor > 0):
        raise ValueError(f"divisor must be finite and > 0, got {divisor}")
    if one_call_per_device is None:
        one_call_per_device = secure_mode or any(t.device.type != "cpu" for t in tensors)
    kw = dict(generator=generator, secure_mode=secure_mode)
    plain = not secure_mode and std > 0 and math.isfinite(std)
    if divisor is not None and not plain:
        undivided = with_gaussian_noise(std, tensors, one_call_per_device=one_call_per_device, **kw)
        for i, noisy in undivided:
            yield i, noisy.div_(divisor)
    elif one_call_per_device:
        yield from _grouped_noise(std, tensors, divisor, **kw)
    elif not plain:
        for i, t in enumerate(tensors):
            yield i, gaussian_noise(std, t, **kw).add_(t)
    else:
        # The common case, ``gaussian_noise``'s one plain draw per tensor without its per-call
        # checks (the same draws, bit for bit).
        draw_std, alpha = _scaled_draw(std, divisor)
        for i, t in enumerate(tensors):
            noise = torch.normal(
                0.0, draw_std, size=t.shape, generator=generator, device=t.device, dtype=t.dtype
            )
            yield i, noise.add_(t, alpha=alpha)


def _scaled_draw(std: float, divisor: Optional[float]) -> Tuple[float, float]:
    """``(std of the draw, factor of the tensor)`` giving ``(t + N(0, std^2)) / divisor``."""
    return (std, 1.0) if divisor is None else (std / divisor, 1.0 / divisor)


def _grouped_noise(
    std: float,
    tensors: Sequence[torch.Tensor],
    divisor: Optional[float],
    **kw,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """``with_gaussian_noise`` with one draw per device and dtype (``divisor`` only without
    secure mode and with ``std > 0``)."""
    draw_std, alpha = _scaled_draw(std, divisor)
    groups: Dict[tuple, list] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for members in groups.values():
        sizes = [tensors[i].numel() for i in members]
        first = tensors[members[0]]
        # The reference only carries shape, device and dtype: an expanded scalar, no storage.
        flat = gaussian_noise(draw_std, first.new_empty(()).expand(sum(sizes)), **kw)
        for i, chunk in zip(members, flat.split(sizes)):
            yield i, chunk.view(tensors[i].shape).add_(tensors[i], alpha=alpha)
