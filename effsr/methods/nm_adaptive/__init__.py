"""Adaptive patch inference over SLS N:M networks — user guide: docs/nm_sparsity.md ("Adaptive patch inference").

* :func:`patch_mse`, :func:`rank_correlation`, :class:`MSEEstimator` — per-patch MSE targets and their estimator.
* :class:`NMEnsemble` — members + estimators; forward = routed inference (argmin est_MSE + λ·cost);
  :func:`load_nm_member` — a member from an N:M (or dense) checkpoint, with its cost fraction.
* :class:`AdaptiveNMModule` — trains the estimators (members frozen), evaluates with measured MACs.
"""

from effsr.methods.nm_adaptive.ensemble import NMEnsemble, load_nm_member
from effsr.methods.nm_adaptive.estimator import MSEEstimator, patch_mse, rank_correlation
from effsr.methods.nm_adaptive.module import AdaptiveNMModule

__all__ = ["AdaptiveNMModule", "MSEEstimator", "NMEnsemble", "load_nm_member", "patch_mse", "rank_correlation"]
