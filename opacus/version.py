"""The package version (PEP 440)."""

__version__ = "1.6.1.dev0"
