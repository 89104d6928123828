"""ASSL: Aligned Structured Sparsity Learning (Zhang et al., NeurIPS 2021) — user guide: docs/assl.md.

Pieces, all plain functions over ``nn.Module``s, then one thin LightningModule:

* :class:`WNConv2d` — weight-normalised conv, filter i = γ_i · W_i / ‖W_i‖, γ initialised to ‖W_i‖ so
  converting a dense network (:func:`convert_to_weight_norm`) leaves its output unchanged.
* :func:`analyze_channels` — traces the network (``torch.fx``) and groups convs whose output channels are
  tied by residual additions: a group with one producer is *free*, with several *constrained*; convs
  feeding ``PixelShuffle``/the output are never pruned, convs reading a group lose input channels.
* :func:`ssa_loss` (sparsity-structure alignment), :class:`GrowingL2` (growing penalty on pruned filters).
* :func:`compute_plan` — local ratio, ``min(ceil(ratio·N), N−1)`` pruned, optional keep-count rounding.
* :func:`prune_network` — folds γ and physically removes filters → a plain network with fewer channels;
  :func:`deploy_network` folds res_scale/mean shift and fuses conv+ReLU / conv+residual for CPU inference
  (what :meth:`ASSLModule.infer` runs, cached);
  :func:`apply_shapes` rebuilds that structure from a checkpoint's plan before its state dict is loaded.
* :class:`ASSLModule` — phases ``dense`` / ``ssa`` / ``regularize`` / ``stabilize`` / ``prune`` / ``finetune``.
"""

from effsr.methods.assl.channels import ChannelGroup, ChannelStructure, analyze_channels
from effsr.methods.assl.deploy import FusedConv2d, deploy_network, hardware_channel_multiple
from effsr.methods.assl.losses import GrowingL2, ssa_loss
from effsr.methods.assl.module import PHASES, ASSLModule, load_dense_weights
from effsr.methods.assl.plan import Ranking, compute_plan, group_importance, num_kept, pruned_indices, top_indices
from effsr.methods.assl.surgery import apply_shapes, conv_shapes, mask_network, prune_network
from effsr.methods.assl.weight_norm import WNConv2d, convert_to_weight_norm, filter_scales, fold_weight_norm

__all__ = [
    "PHASES",
    "ASSLModule",
    "ChannelGroup",
    "ChannelStructure",
    "FusedConv2d",
    "GrowingL2",
    "Ranking",
    "WNConv2d",
    "analyze_channels",
    "apply_shapes",
    "compute_plan",
    "conv_shapes",
    "convert_to_weight_norm",
    "deploy_network",
    "filter_scales",
    "fold_weight_norm",
    "group_importance",
    "hardware_channel_multiple",
    "load_dense_weights",
    "mask_network",
    "num_kept",
    "prune_network",
    "pruned_indices",
    "ssa_loss",
    "top_indices",
]
