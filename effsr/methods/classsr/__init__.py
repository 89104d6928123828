"""ClassSR (Kong et al., CVPR 2021) — user guide: docs/classsr.md; specification: docs/methods/classsr.md.

A patch classifier routes LR sub-images to K branches of growing width:

* :mod:`~effsr.methods.classsr.network` — :class:`Classifier`, :class:`ClassSRNet` (K branches from any effsr
  backbone + the classifier; soft mixture in training), :class:`RoutedClassSR` (argmax routing, as deployed).
* :mod:`~effsr.methods.classsr.losses` — :func:`class_loss` (L_class), :func:`average_loss` (L_avg, global batch).
* :mod:`~effsr.methods.classsr.split` — :func:`split_by_score` (K equal classes), :func:`split_by_thresholds`
  (fixed PSNR thresholds), the scoring/cache of every training sub-image.
* :mod:`~effsr.methods.classsr.cost` — :func:`routed_costs` (ClassSR's cost at class proportions), the
  measured routing per image and set.
* :mod:`~effsr.methods.classsr.checkpoints` — the reference (-O) and ``split_model`` through :mod:`effsr.weights`,
  branches saved alone as plain backbone checkpoints (:func:`export_backbone`).
* :mod:`~effsr.methods.classsr.module` — :class:`ClassSRModule`: ``reference -> split -> branches -> classifier
  -> joint`` as PhaseSchedule phases, routed tiled evaluation.
"""

from effsr.methods.classsr.checkpoints import (
    backbone_config,
    export_backbone,
    load_reference_weights,
    load_split_model,
    wide_branch_filter,
)
from effsr.methods.classsr.cost import CLASS_NAMES, routed_costs
from effsr.methods.classsr.losses import average_loss, class_loss
from effsr.methods.classsr.module import PHASE_KINDS, ClassSRModule
from effsr.methods.classsr.network import Classifier, ClassSRNet, RoutedClassSR
from effsr.methods.classsr.split import SPLIT_VERSION, TrainSubsetSettable, split_by_score, split_by_thresholds

__all__ = [
    "CLASS_NAMES",
    "PHASE_KINDS",
    "SPLIT_VERSION",
    "ClassSRModule",
    "ClassSRNet",
    "Classifier",
    "RoutedClassSR",
    "TrainSubsetSettable",
    "average_loss",
    "backbone_config",
    "class_loss",
    "export_backbone",
    "load_reference_weights",
    "load_split_model",
    "routed_costs",
    "split_by_score",
    "split_by_thresholds",
    "wide_branch_filter",
]
