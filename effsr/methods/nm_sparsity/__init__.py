"""SLS: N:M fine-grained structured sparsity with learned layer-wise N (Oh et al., CVPR 2022) — user guide:
docs/nm_sparsity.md, spec docs/methods/nm_sparsity.md.

* :class:`NMConv2d` (layer) — the N:M conv: uint8 magnitude ranks, M−1 priority scores, STE keep mask.
* convert — :func:`convert_to_nm` (every conv but the first/last), :func:`dense_layer_macs`, :func:`nm_macs_720p`
  (an N:M network's MACs at 720p and dense), the cost terms
  :func:`sparse_cost_fraction` / :func:`patch_cost`, :func:`fill_budget`, :func:`export_masked`,
  :func:`to_semi_structured_2to4` (experimental, CUDA).
* :class:`NMSparsityModule` (module) — phases ``dense`` / ``search`` / ``finetune``; baselines as ``mode``.

Adaptive patch inference is its own package, :mod:`effsr.methods.nm_adaptive`; its names resolve here too (lazily:
nm_adaptive imports this package) so configs written as ``effsr.methods.nm_sparsity.AdaptiveNMModule`` keep loading.
"""

from typing import Any

from effsr.methods.nm_sparsity.convert import (
    convert_to_nm,
    dense_layer_macs,
    export_masked,
    fill_budget,
    nm_layers,
    nm_macs_720p,
    patch_cost,
    sparse_cost_fraction,
    sparsifiable_convs,
    to_semi_structured_2to4,
)
from effsr.methods.nm_sparsity.layer import NMConv2d, group_view, magnitude_ranks, ungroup_view
from effsr.methods.nm_sparsity.module import (
    SCORE_GROUP,
    AnnealRule,
    CostUnit,
    Mode,
    NMSparsityModule,
    ScoreClamp,
    load_network_weights,
)

__all__ = [
    "SCORE_GROUP",
    "AdaptiveNMModule",
    "AnnealRule",
    "CostUnit",
    "MSEEstimator",
    "Mode",
    "NMConv2d",
    "NMEnsemble",
    "NMSparsityModule",
    "ScoreClamp",
    "convert_to_nm",
    "dense_layer_macs",
    "export_masked",
    "fill_budget",
    "group_view",
    "load_network_weights",
    "load_nm_member",
    "magnitude_ranks",
    "nm_layers",
    "nm_macs_720p",
    "patch_cost",
    "patch_mse",
    "rank_correlation",
    "sparse_cost_fraction",
    "sparsifiable_convs",
    "to_semi_structured_2to4",
    "ungroup_view",
]

_ADAPTIVE = {"AdaptiveNMModule", "MSEEstimator", "NMEnsemble", "load_nm_member", "patch_mse", "rank_correlation"}


def __getattr__(name: str) -> Any:
    """The adaptive names, from :mod:`effsr.methods.nm_adaptive` (their home since the package split)."""
    if name in _ADAPTIVE:
        from effsr.methods import nm_adaptive

        return getattr(nm_adaptive, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
