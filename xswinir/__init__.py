"""XSwinIR: SwinIR image restoration trained with an explainable texture loss."""

__version__ = "0.1.0"
