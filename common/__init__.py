"""wspo: weak-to-strong alignment in two phases (see README and DESIGN)."""

__version__ = "0.1.0"
