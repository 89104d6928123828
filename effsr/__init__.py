"""effsr: efficient image super-resolution methods in one PyTorch Lightning suite."""

__version__ = "0.1.0"
