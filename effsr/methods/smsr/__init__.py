"""SMSR (Wang et al., CVPR 2021): sparse-mask SR — user guide: docs/smsr.md, specification: docs/methods/smsr.md.

* :mod:`~effsr.methods.smsr.block` — :class:`SMB`, the sparse mask block: masked 3x3 convs under the training
  rule, and the sparse execution with hard masks (dense channels by conv, sparse ones at masked positions).
* :mod:`~effsr.methods.smsr.network` — :class:`SMSR` (official state_dict key names), :class:`SMM`, CA layer.
* :mod:`~effsr.methods.smsr.cost` — :func:`analytic_macs_720p` at measured densities, :func:`plain_macs_720p`.
* :mod:`~effsr.methods.smsr.convert` — official checkpoints: :func:`smsr_from_state_dict`,
  :func:`load_smsr_weights`, :func:`convert_official_checkpoint` (``effsr convert --method smsr``).
* :mod:`~effsr.methods.smsr.module` — :class:`SMSRModule`: L1 + λ·sparsity, Gumbel τ schedule, measured cost.
"""

from effsr.methods.smsr.block import DENSE_ABOVE_DENSITY, LAYER_RULES, SMB
from effsr.methods.smsr.convert import (
    convert_official_checkpoint,
    load_smsr_weights,
    network_init_args,
    smsr_from_state_dict,
)
from effsr.methods.smsr.cost import analytic_macs_720p, deployed_params, plain_macs_720p
from effsr.methods.smsr.module import SMSRModule
from effsr.methods.smsr.network import SMM, SMSR, CALayer, gumbel_softmax

__all__ = [
    "DENSE_ABOVE_DENSITY",
    "LAYER_RULES",
    "SMB",
    "SMM",
    "SMSR",
    "CALayer",
    "SMSRModule",
    "analytic_macs_720p",
    "convert_official_checkpoint",
    "deployed_params",
    "gumbel_softmax",
    "load_smsr_weights",
    "network_init_args",
    "plain_macs_720p",
    "smsr_from_state_dict",
]
