"""The package's version, defined once: the archive writer records it at write time."""

__version__ = "0.2.0"
