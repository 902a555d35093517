"""worldloom: large world models on a laptop CPU."""

__version__ = "0.1.0"
