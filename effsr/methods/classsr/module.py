""":class:`ClassSRModule`: the ClassSR pipeline ``reference -> split -> branches -> classifier -> joint`` as
:class:`effsr.phases.PhaseSchedule` phases, evaluated with routed tiled inference (one batch per branch,
overlap averaging, whole image covered). Networks, losses, split, cost and files are the package's other
modules (see :mod:`effsr.methods.classsr`).

Phase kinds (a phase's ``name`` starts with its kind, or ``settings.kind`` names it; names stay unique):

- ``reference``: the wide branch (last) trained with L1 on every sub-image (the paper's "-O" model), saved as
  ``<default_root_dir>/reference/reference.ckpt`` when the split starts; ``until: reference_ready`` ends it
  after one step when ``reference_checkpoint`` was loaded (the loaded weights are restored before the split).
- ``split`` (``steps: 0``): the reference (or ``split_model``) scores every training sub-image by PSNR; sorted
  and cut into K equal classes (highest PSNR -> class 0 -> narrowest branch), or by ``split_thresholds``.
  Cached under ``split_cache_dir`` keyed by the data and the scoring weights.
- ``branches``: branch k is trained on class k only (``settings.branch``: an index or a list; default all K
  at once, each sample going to its class's branch). The sampler draws from those classes only;
  ``settings.all_classes: true`` trains each selected branch on every sub-image instead (a pretraining before
  its class, effsr's option).
- ``classifier``: branches frozen, classifier trained with w1·L1 + w2·L_class + w3·L_avg on the soft mixture.
- ``joint``: everything trained with the same loss.

Cost (:func:`routed_costs`, counted by :mod:`effsr.cost`): ClassSR's definition, the classifier plus each branch
weighted by the share of patches routed to it. :meth:`ClassSRModule.deployed_network` is the routed model
(:class:`RoutedClassSR`), so ``effsr profile`` times routed inference and reports that cost as its headline, at
the class proportions of the last evaluation (saved in the checkpoint), the ``cost_proportions`` option, or,
labelled as such, equal shares.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from effsr.checkpointing import save_side_checkpoint
from effsr.distributed import gather_with_grad, rank
from effsr.errors import ConfigError
from effsr.inference.tiling import RoutedOutput
from effsr.methods.classsr.checkpoints import (
    export_backbone,
    load_branch_weights,
    load_reference_weights,
    run_config_path,
)
from effsr.methods.classsr.cost import RoutedCostMixin
from effsr.methods.classsr.losses import average_loss, class_loss
from effsr.methods.classsr.network import ClassSRNet, RoutedClassSR
from effsr.methods.classsr.split import SplitMixin
from effsr.models.base import SRModule

PHASE_KINDS = ("reference", "split", "branches", "classifier", "joint")


class ClassSRModule(SplitMixin, RoutedCostMixin, SRModule):
    """ClassSR training phases and routed inference; ``network`` is a :class:`ClassSRNet`.

    Args:
        network: the branches and the classifier.
        loss_weights: (w1, w2, w3) of L1 (on [0, 1] whatever the pixel range), L_class and normalised L_avg.
        patch_size: LR patch side of routed inference (paper 32).
        stride: LR stride between patches (paper 28, i.e. overlap 4); the grid covers the whole image.
        route_batch_size: patches per branch call in routed inference; None: 4 on CPU (cache-sized, faster than
            64 at every width), 64 on a GPU (:func:`effsr.inference.tiling.route_batch_size`).
        force_branch: route every patch through this branch (the "-O" baselines and ablations).
        reference_checkpoint: the "-O" model to start from instead of training it (a checkpoint of the backbone
            at the wide width, ``network.*`` keys, e.g. ``<run>/reference/reference.ckpt``, a ClassSR checkpoint,
            or a plain state dict); loaded when the pipeline starts (not in ``__init__``) and again right
            before the split is scored, so no training step touches it.
        branches_checkpoint: a ClassSR checkpoint whose branches (and split) this fit starts from, loaded when its
            first phase starts: a schedule of ``classifier`` (and ``joint``) alone then studies a classifier recipe
            on trained branches without training them again (the official ClassSR stage loads three branch files,
            ``pretrain_model_G_branch1..3``).
        wide_from_reference: the wide branch keeps the reference weights for ``branches`` (effsr's variant);
            False (official): it restarts from its initial weights after the split.
        split_model: score the split with this model instead of the reference (official: one MSRResNet for all
            backbones): an effsr SR checkpoint of the same scale (its run's ``config.yaml``) or
            ``CKPT@CONFIG.yaml``; a ClassSR checkpoint scores with its wide branch.
        split_thresholds: fixed PSNR thresholds (dB, K-1 of them, e.g. the official ``[35.15, 27.17]``)
            instead of K equal classes: class k = sub-images with k thresholds above their score.
        export_backbones: write the reference (when the split starts) and each branch after its class training
            (when ``classifier`` starts) as plain backbone checkpoints ``<default_root_dir>/<name>/<name>.ckpt``
            with a ``config.yaml`` beside it, for ``effsr test``/``effsr compare``.
        split_metric: ``rgb`` (official: RGB PSNR, border crop = scale) or ``y``.
        split_batch_size: sub-images per scoring batch.
        split_cache_dir: folder of cached splits (default ``<data.cache_dir>/classsr_splits``).
        route_maps_per_set: routing maps logged per validation set and validation run (None: every image).
        cost_proportions: class shares (one per branch, normalised) that :meth:`cost_report` and ``effsr profile``
            report the routed cost at, instead of those measured in the last evaluation.
        **kwargs: forwarded to :class:`SRModule` (``tile_above_pixels`` defaults to -1: routing tiles already).
    """

    def __init__(self, network: ClassSRNet, *args: Any, loss_weights: tuple[float, float, float] = (1000.0, 0.5, 3.0),
                 patch_size: int = 32, stride: int = 28, route_batch_size: int | None = None,
                 force_branch: int | None = None,
                 reference_checkpoint: str | None = None, branches_checkpoint: str | None = None,
                 wide_from_reference: bool = False,
                 split_model: str | None = None, split_thresholds: list[float] | None = None,
                 export_backbones: bool = True,
                 split_metric: Literal["rgb", "y"] = "rgb", split_batch_size: int = 64,
                 split_cache_dir: str | None = None, route_maps_per_set: int | None = None,
                 cost_proportions: list[float] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("tile_above_pixels", -1)
        super().__init__(network, *args, **kwargs)
        if not 0 < stride <= patch_size:
            raise ConfigError(f"ClassSR stride must be in 1..patch_size ({patch_size}), got {stride}")
        if force_branch is not None and not 0 <= force_branch < network.num_classes:
            raise ConfigError(f"force_branch must be in 0..{network.num_classes - 1}, got {force_branch}")
        if route_batch_size is not None and route_batch_size < 1:
            raise ConfigError(f"route_batch_size must be >= 1 or null (device default), got {route_batch_size}")
        if split_metric not in ("rgb", "y"):
            raise ConfigError(f"split_metric must be 'rgb' or 'y', got {split_metric!r}")
        if cost_proportions is not None:
            shares = [float(value) for value in cost_proportions]
            if len(shares) != network.num_classes or min(shares) < 0 or sum(shares) <= 0:
                raise ConfigError(f"cost_proportions needs {network.num_classes} non-negative shares, got {shares}")
            cost_proportions = [value / sum(shares) for value in shares]
        if split_thresholds is not None and len(split_thresholds) != network.num_classes - 1:
            raise ConfigError(f"split_thresholds needs {network.num_classes - 1} values (dB), got {split_thresholds}")
        self.cost_proportions = cost_proportions
        self.split_model = split_model
        self.fixed_thresholds = (None if split_thresholds is None
                                 else sorted((float(value) for value in split_thresholds), reverse=True))
        self.export_backbones = export_backbones
        self.loss_weights = tuple(float(weight) for weight in loss_weights)
        self.patch_size = patch_size
        self.stride = stride
        self.route_batch_size = route_batch_size
        self.force_branch = force_branch
        self.reference_checkpoint = reference_checkpoint
        self.branches_checkpoint = branches_checkpoint
        self._branches_loaded = False
        self.wide_from_reference = wide_from_reference
        self.split_metric = split_metric
        self.split_batch_size = split_batch_size
        self.split_cache_dir = split_cache_dir
        self.route_maps_per_set = route_maps_per_set
        self.split_thresholds: list[float] = []
        self.split_labels: Tensor | None = None
        self.split_key: str | None = None
        self.split_info: dict[str, Any] = {}
        self._initial_wide = {key: value.detach().clone() for key, value in network.branches[-1].state_dict().items()}
        self._patch_macs_cache: tuple[list[int], int] | None = None
        self._last_route: RoutedOutput | None = None
        self._route_maps_logged: dict[tuple[str, int], int] = {}
        self._measured_counts: Tensor | None = None
        self._measured_from: dict[str, Any] = {}
        self._routing_counts: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.network.num_classes

    def phase_kind(self, name: str | None = None, settings: dict[str, Any] | None = None) -> str | None:
        """The kind (reference/split/branches/classifier/joint) of a phase, from ``settings.kind`` or its name."""
        name = self.phase_name if name is None else name
        settings = self.phase_settings if settings is None else settings
        if name is None:
            return None
        kind = settings.get("kind") or next((kind for kind in PHASE_KINDS if name.startswith(kind)), None)
        if kind not in PHASE_KINDS:
            raise ConfigError(
                f"ClassSR phase '{name}': the name must start with one of {PHASE_KINDS} (or set settings.kind)"
            )
        return kind

    def trained_branches(self, name: str | None = None, settings: dict[str, Any] | None = None) -> list[int]:
        """Branches trained in a phase (default: the current one)."""
        name = self.phase_name if name is None else name
        settings = self.phase_settings if settings is None else settings
        kind = self.phase_kind(name, settings)
        if kind in ("reference", "split", None):
            return [self.num_classes - 1]
        if kind == "classifier":
            return []
        selected = settings.get("branch") if kind == "branches" else None
        if selected is None:
            return list(range(self.num_classes))
        selected = [selected] if isinstance(selected, int) else list(selected)
        if any(not 0 <= int(k) < self.num_classes for k in selected):
            raise ConfigError(f"phase '{name}': branch must be in 0..{self.num_classes - 1}, got {selected}")
        return sorted(int(k) for k in selected)

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        """Sets the trainable set, computes the split (``split``) and restricts the data (``branches``)."""
        kind = self.phase_kind(name, settings)
        if self.branches_checkpoint and not self._branches_loaded:  # a fresh fit's first phase
            self.rebuild_structure(load_branch_weights(self.network, self.branches_checkpoint))
            self._branches_loaded = True
        if kind == "reference" and self.split_model and not Path(self.split_model.partition("@")[0]).is_file():
            raise ConfigError(f"model.init_args.split_model '{self.split_model}' does not exist; train that model "
                              "first (e.g. `effsr fit --config experiments/classsr_msrresnet_x4.yaml` writes "
                              "runs/classsr_msrresnet_x4/reference/reference.ckpt) or set split_model: null")
        if kind == "reference" and self.reference_checkpoint:
            load_reference_weights(self.network, self.reference_checkpoint)
        if kind == "split":
            if self.reference_checkpoint:  # the loaded -O model itself, whatever the reference phase did
                load_reference_weights(self.network, self.reference_checkpoint)
            self._export("reference", self.num_classes - 1)
            self.warn_unstarted_reference()
            self.compute_split(self._datamodule())
            if not self.wide_from_reference:
                self.network.branches[-1].load_state_dict(self._initial_wide)
            return False
        if kind == "classifier":
            self.warn_unstarted_branches()
            for index in range(self.num_classes):
                self._export(f"branch_{index}", index)
        if kind == "joint":
            self._save_before_joint()
        if kind == "branches" and self.split_labels is None and not settings.get("all_classes"):
            raise ConfigError(f"phase '{name}' trains branches on their classes: put a `split` phase before it")
        self._set_trainable(name, settings)
        self._apply_data_subset()
        return True

    def _set_trainable(self, name: str | None = None, settings: dict[str, Any] | None = None) -> None:
        """requires_grad of a phase: the trained branches, the classifier in classifier/joint."""
        kind = self.phase_kind(name, settings)
        trained = set(self.trained_branches(name, settings))
        for parameter in self.network.classifier.parameters():
            parameter.requires_grad_(kind in ("classifier", "joint"))
        for index, branch in enumerate(self.network.branches):
            for parameter in branch.parameters():
                parameter.requires_grad_(index in trained)

    def on_checkpoint_loaded(self, checkpoint: dict[str, Any]) -> None:
        """Re-applies the phase's trainable set (the split came back with :meth:`rebuild_structure`); the
        optimizer is rebuilt on it when resuming."""
        if self.phase_kind() not in (None, "split"):
            self._set_trainable()

    def _save_before_joint(self) -> None:
        """The whole ClassSR model before ``joint`` (``export_backbones``): ``<default_root_dir>/before_joint/``
        ``before_joint.ckpt`` with the run's ``config.yaml``, so joint's effect is measurable in one run."""
        if not self.export_backbones or self._trainer is None:
            return
        path = save_side_checkpoint(self.trainer, "before_joint")
        rank_zero_info(f"[effsr] ClassSR: the model before joint saved as {path}")

    def _export(self, name: str, index: int) -> None:
        """Branch ``index`` as a plain backbone checkpoint (``export_backbones``; rank 0 only)."""
        if not self.export_backbones or self._trainer is None:
            return
        source = run_config_path(self.trainer)  # every rank: trainer.log_dir is a collective (strategy.broadcast)
        if rank() != 0:
            return
        import yaml

        run_config = yaml.safe_load(source.read_text()) if source is not None else None
        specs = self.network.branch_specs
        info = {"name": name, "branch": index, "phase": self.phase_name, "global_step": int(self.global_step),
                "reference_checkpoint": self.reference_checkpoint}
        path = export_backbone(self.network.branches[index], Path(self.trainer.default_root_dir) / name, name,
                               specs[index] if specs else None, run_config, self.scale, info)
        rank_zero_info(f"[effsr] ClassSR: {name} (branch {index}) saved as {path}"
                       + ("" if specs else " (no config.yaml: the network was given as `branches`)"))

    def on_fit_finished(self) -> None:
        """A fit that ends in ``classifier``/``joint`` checks that the classifier's routing depends on the patch."""
        if self.phase_kind() in ("classifier", "joint"):
            self.warn_constant_classifier()

    def phase_condition(self, name: str) -> bool:
        """``reference_ready``: a reference checkpoint was loaded."""
        if name == "reference_ready":
            return self.reference_checkpoint is not None
        return super().phase_condition(name)

    def on_fit_begin(self) -> None:
        """Re-applies the per-class data subset after a resume."""
        self._apply_data_subset()

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any | None:
        """The config's LR scheduler, else for a phase with ``cosine_steps`` (and ``eta_min``, default 1e-7 as
        officially) its own cosine schedule over that many steps."""
        configured = super().build_lr_scheduler(optimizer)
        steps = self.phase_settings.get("cosine_steps")
        if configured is not None or steps is None:
            return configured
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=int(steps), eta_min=float(self.phase_settings.get("eta_min", 1e-7)))

    def labels_for(self, indices: Tensor) -> Tensor:
        """Class of each training sub-image index (on the indices' device)."""
        if self.split_labels is None:
            raise ConfigError("no ClassSR split yet: put a `split` phase before the `branches` phases")
        return self.split_labels[indices.cpu()].to(indices.device).long()

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """reference: L1 of the wide branch; branches: L1 of each sample's class branch; classifier/joint:
        w1*L1 + w2*L_class + w3*L_avg (L_avg over the global batch under DDP)."""
        kind = self.phase_kind() or "reference"
        if kind in ("classifier", "joint"):
            sr, probabilities = self.network.mixture(lr)
            l1 = F.l1_loss(sr, hr) / self.network.pixel_range
            l_class = class_loss(probabilities)
            l_avg = average_loss(gather_with_grad(probabilities))
            w1, w2, w3 = self.loss_weights
            loss = w1 * l1 + w2 * l_class + w3 * l_avg
            logs = {"l1": l1.detach(), "l_class": l_class.detach(), "l_avg": l_avg.detach(),
                    f"{kind}/loss": loss.detach()}
            choices = probabilities.detach().argmax(dim=1)
            for k in range(self.num_classes):
                logs[f"class_prob/{k}"] = probabilities[:, k].detach().mean()
                logs[f"class_frac/{k}"] = (choices == k).float().mean()
            self._print_training_routing(choices, kind)
            return loss, logs
        if kind == "branches":
            return self._branches_loss(lr, hr, batch)
        sr = self.network.branches[-1](lr)
        loss = F.l1_loss(sr, hr)
        return loss, {"l1": loss.detach(), f"{kind}/loss": loss.detach()}

    def _print_training_routing(self, choices: Tensor, kind: str) -> None:
        """Without a logger, the argmax shares over training are printed every ``log_every_n_steps`` steps."""
        if self._trainer is None or self.loggers:
            return
        counts = torch.bincount(choices.cpu(), minlength=self.num_classes).double()
        self._routing_counts = counts if self._routing_counts is None else self._routing_counts + counts
        every = max(int(getattr(self.trainer, "log_every_n_steps", 50) or 50), 1)
        if (self.global_step + 1) % every == 0:
            total = self._routing_counts / self._routing_counts.sum()
            rank_zero_info(f"[effsr] ClassSR {kind} step {int(self.global_step) + 1}: argmax shares over the last "
                           f"{every} steps narrow→wide " + "/".join(f"{100 * p:.0f}%" for p in total.tolist()))
            self._routing_counts = None

    def _branches_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        everything = bool(self.phase_settings.get("all_classes"))
        labels = None if everything else self.labels_for(batch["index"])
        total = lr.new_zeros(())
        used = 0
        logs: dict[str, Tensor] = {}
        for k in self.trained_branches():
            branch = self.network.branches[k]
            mask = torch.ones_like(batch["index"], dtype=torch.bool) if labels is None else labels == k
            count = int(mask.sum())
            logs[f"class_frac/{k}"] = mask.float().mean()
            if count == 0:
                # Keeps every trained parameter in the graph (DDP expects gradients for all of them).
                total = total + sum(parameter.sum() for parameter in branch.parameters()) * 0.0
                continue
            l1 = F.l1_loss(branch(lr[mask]), hr[mask])
            logs[f"l1_branch{k}"] = l1.detach()
            total = total + l1 * count
            used += count
        loss = total / max(used, 1)
        logs["l1"] = loss.detach()
        logs["branches/loss"] = loss.detach()
        return loss, logs

    def _router(self, proportions: Sequence[float] | None = None, source: str = "") -> RoutedClassSR:
        return RoutedClassSR(self.network, self.patch_size, self.stride, self.route_batch_size, self.force_branch,
                             proportions, source)

    def deployed_network(self) -> RoutedClassSR:
        """The routed model (what inference runs), carrying the class proportions its cost is reported at."""
        return self._router(*self.cost_proportions_used())

    def policy(self, patches: Tensor) -> Tensor:
        """Branch index per LR patch: classifier argmax or the forced branch."""
        return self._router().policy(patches)

    def route(self, lr: Tensor, count_macs: bool = False) -> RoutedOutput:
        """Routed tiled inference of one (1, C, H, W) image in the network's pixel range."""
        return self._router().route(lr, count_macs=count_macs)

    def infer(self, lr: Tensor) -> Tensor:
        """Routed tiled inference over the whole image; in evaluation the patches per branch are measured
        (the last image's routing is kept for logging)."""
        outputs = []
        for index in range(lr.shape[0]):
            self._last_route = self.route(lr[index:index + 1])
            counts = self._last_route.patches_per_network.tolist()
            self.add_measurement(**{f"class_count_{k}": count for k, count in enumerate(counts)})
            outputs.append(self._last_route.sr)
        return torch.cat(outputs, dim=0)

    def structure_state(self) -> dict[str, Any]:
        """The split (labels per sub-image, thresholds, cache key) and the last evaluation's class counts."""
        counts = None if self._measured_counts is None else self._measured_counts.tolist()
        return {"split_thresholds": list(self.split_thresholds), "split_key": self.split_key,
                "split_labels": self.split_labels, "split_info": dict(self.split_info),
                "measured_class_counts": counts, "measured_from": dict(self._measured_from)}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        """Restores the split and the measured class counts (older checkpoints have none)."""
        self.split_thresholds = list(state.get("split_thresholds", []))
        self.split_key = state.get("split_key")
        self.split_labels = state.get("split_labels")
        self.split_info = dict(state.get("split_info") or {})
        counts = state.get("measured_class_counts")
        self._measured_counts = None if counts is None else torch.tensor(counts, dtype=torch.float64)
        self._measured_from = dict(state.get("measured_from") or {})


