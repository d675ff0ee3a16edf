"""The deliberately broken DP-SGD variants of ``examples/sabotage.py``, for the tests.

They are not shipped in the ``opacus`` package; this loads the one copy that the auditing
example uses too, so that tests and example cannot drift apart.
"""

import importlib.util
import os

_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "examples",
    "sabotage.py",
)
_spec = importlib.util.spec_from_file_location("_opacus_examples_sabotage", _PATH)
_sabotage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sabotage)

MixedSamples = _sabotage.MixedSamples
NoClipping = _sabotage.NoClipping
QuietNoise = _sabotage.QuietNoise
SwappedSamples = _sabotage.SwappedSamples
engine_with = _sabotage.engine_with

__all__ = ["MixedSamples", "NoClipping", "QuietNoise", "SwappedSamples", "engine_with"]
