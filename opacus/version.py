__version__ = "1.6.1.dev0"
