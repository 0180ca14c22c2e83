"""The library's version, in a module of its own so the registry can read it without importing
the package's ``__init__`` (which imports the registry)."""

__version__ = "0.1.0"
