"""lmtool: train, sample from, score and evaluate RNN language models."""

__version__ = "0.1.0"

# torch-free, so importing it costs nothing: `except lmtool.LmtoolError` works before any model is loaded
from lmtool.errors import LmtoolError

__all__ = ["load_model", "LmtoolError", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `lmtool --help` does not pay for importing torch.
    if name == "load_model":
        from lmtool.api import load_model

        return load_model
    raise AttributeError(f"module 'lmtool' has no attribute {name!r}")
