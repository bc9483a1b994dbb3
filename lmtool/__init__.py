"""lmtool: train, sample from, score and evaluate RNN language models."""

__version__ = "0.1.0"
