"""lwfc host tools: table design, decoding, serving, evaluation and the command line."""

__version__ = "0.1.0"
