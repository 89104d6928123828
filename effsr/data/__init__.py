"""effsr's data pipeline: image I/O, sources, decoded-array cache, SRDataModule, downloads."""

from effsr.data.datamodule import SRDataModule
from effsr.data.io import read_image, write_image

__all__ = ["SRDataModule", "read_image", "write_image"]
