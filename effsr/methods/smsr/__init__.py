"""SMSR (Wang et al., CVPR 2021): sparse-mask SR — user guide: docs/smsr.md, specification: docs/methods/smsr.md."""

from effsr.methods.smsr.module import (
    SMB,
    SMM,
    SMSR,
    CALayer,
    MeanShift,
    SMSRModule,
    analytic_macs_720p,
    convert_official_checkpoint,
    gumbel_softmax,
    load_smsr_weights,
    network_init_args,
    plain_macs_720p,
    smsr_from_state_dict,
)

__all__ = [
    "SMB",
    "SMM",
    "SMSR",
    "CALayer",
    "MeanShift",
    "SMSRModule",
    "analytic_macs_720p",
    "convert_official_checkpoint",
    "gumbel_softmax",
    "load_smsr_weights",
    "network_init_args",
    "plain_macs_720p",
    "smsr_from_state_dict",
]
