"""Integrations with other training libraries (optional dependencies, imported on demand).

- ``opacus.integrations.transformers``: ``DPTrainer``, a Hugging Face ``transformers.Trainer``
  that trains with DP-SGD (``pip install "opacus[transformers]"``).

Nothing here is imported by ``import opacus``: the core does not depend on these libraries.
"""
