"""LightningModules shared by all methods."""

from effsr.models.base import SRModule

__all__ = ["SRModule"]
