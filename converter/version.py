"""qconv's version, in a module of its own so that the core can name it without importing the
library surface (``qconv/__init__.py`` imports everything)."""

__version__ = "0.1.0"
