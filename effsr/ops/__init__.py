"""Image operations: MATLAB-compatible bicubic resize and the bicubic degradation."""

from effsr.ops.imresize import bicubic_degrade, imresize, imresize_uint8, mod_crop

__all__ = ["bicubic_degrade", "imresize", "imresize_uint8", "mod_crop"]
