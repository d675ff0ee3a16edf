"""opacus: train PyTorch models with differential privacy (DP-SGD).

The top-level names are resolved lazily so that ``import opacus`` stays cheap and free of
import cycles between the subpackages.
"""

import importlib

from opacus.version import __version__

_LAZY = {
    "GradSampleModule": "opacus.grad_sample",
    "GradSampleModuleFastGradientClipping": "opacus.grad_sample",
    "PrivacyEngine": "opacus.privacy_engine",
}

__all__ = [
    "GradSampleModule",
    "GradSampleModuleFastGradientClipping",
    "PrivacyEngine",
    "__version__",
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'opacus' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
