"""SMSR's LightningModule: L1 + λ·sparsity with a warmed-up λ, Gumbel τ from a schedule, per-image measured cost."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.errors import CheckpointError, ConfigError
from effsr.loggers import log_image
from effsr.methods.smsr.block import LAYER_RULES
from effsr.methods.smsr.convert import network_init_args
from effsr.methods.smsr.cost import analytic_macs_720p, deployed_params, plain_macs_720p
from effsr.models.base import SRModule


class SMSRModule(SRModule):
    """SMSR training/evaluation: L1 + λ·sparsity (linear warm-up), Gumbel τ from the ``tau`` schedule.

    Args:
        network: an :class:`SMSR`.
        sparsity_weight: λ after warm-up (paper 0.1).
        sparsity_warmup_steps: optimizer steps of the linear warm-up of λ (paper: 50 "epochs" of 1000 iterations).
        constant_tau: if set, τ stays at this value (official code behaviour: 1.0) and the schedule is ignored.
        layer_rule: the training-mode layer rule (:meth:`SMB.forward_masked`): ``"fixed"`` (default, the
            upstream fix: layer i's input split by layer i−1's masks, as the sparse path executes it) or
            ``"pre_fix"`` (layer i's own masks: the first official code, used to train the released weights).
            Evaluation always runs the sparse path.
        dense_masks: train and evaluate the same network with every mask fixed all-dense and no sparsity loss
            (the dense baseline: every channel at every position; the mask branches never run and are not
            counted in its cost).
        **kwargs: forwarded to :class:`SRModule`.
    """

    def __init__(
        self,
        network: nn.Module,
        *args: Any,
        sparsity_weight: float = 0.1,
        sparsity_warmup_steps: int = 50_000,
        constant_tau: float | None = None,
        layer_rule: Literal["fixed", "pre_fix"] = "fixed",
        dense_masks: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, *args, **kwargs)
        if layer_rule not in LAYER_RULES:
            raise ConfigError(f"model.init_args.layer_rule must be one of {', '.join(LAYER_RULES)}; got {layer_rule!r}")
        self.layer_rule = layer_rule
        self.sparsity_weight = sparsity_weight
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.constant_tau = constant_tau
        self.dense_masks = dense_masks
        if constant_tau is not None:
            network.tau = constant_tau
        self._measured_densities: list[float] | None = None

    def sparsity_lambda(self) -> float:
        if self.sparsity_warmup_steps <= 0:
            return self.sparsity_weight
        return self.sparsity_weight * min(self.global_step / self.sparsity_warmup_steps, 1.0)

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.dense_masks:
            l1 = F.l1_loss(self.network.forward_dense(lr), hr)
            return l1, {"l1": l1.detach()}
        sr, sparsity = self.network.forward_train(lr, self.layer_rule)
        l1 = F.l1_loss(sr, hr)
        weight = self.sparsity_lambda()
        logs = {
            "l1": l1.detach(),
            "sparsity": sparsity.detach(),
            "lambda": torch.tensor(weight),
            "tau": torch.tensor(float(self.network.tau)),
        }
        for index, spatial in enumerate(self.network.last_spatial):
            logs[f"spatial_density_smm{index}"] = spatial.mean()
        width = self.network.head[0].out_channels
        for index, counts in enumerate(self.network.sparse_channel_counts()):
            for layer, count in enumerate(counts):
                logs[f"dense_channels/smm{index}_layer{layer}"] = torch.tensor(float(width - count))
        return l1 + weight * sparsity, logs

    def set_schedule_value(self, name: str, value: float) -> None:
        super().set_schedule_value(name, value)
        if name == "tau" and self.constant_tau is None:
            self.network.tau = float(value)

    def infer(self, lr: Tensor) -> Tensor:
        """The network (sparse path in eval); in evaluation each SMM's active pixels are measured."""
        if self.dense_masks:
            return self.network.forward_dense(lr)
        sr = self.network(lr)
        if not self.network.training and self.network.last_spatial:
            pixels = self.network.last_spatial[0][:, 0].numel()
            self.add_measurement(pixels=pixels, **{f"active_smm{index}": float(mask.sum())
                                                   for index, mask in enumerate(self.network.last_spatial)})
        return sr

    def image_measurements(self, measured: dict[str, float], sr: Tensor, hr: Tensor) -> dict[str, Any]:
        """Per image: each SMM's spatial density, their mean, and ``macs_720p`` at this image's densities
        (linear in the densities, so a set's mean is the cost at the set's mean densities)."""
        if not measured.get("pixels"):
            return {}
        densities = [measured[f"active_smm{index}"] / measured["pixels"] for index in range(len(self.network.body))]
        return {"macs_720p": float(analytic_macs_720p(self.network, densities)[0]),
                "spatial_density": sum(densities) / len(densities),
                **{f"spatial_density_smm{index}": value for index, value in enumerate(densities)}}

    def on_eval_measured(self, stage: str, per_set: dict[str, dict[str, Any]], overall: dict[str, Any],
                         n_images: int) -> None:
        """:meth:`cost_report` follows the densities measured over all images of the last evaluation."""
        self._measured_densities = [float(overall[f"spatial_density_smm{index}"])
                                    for index in range(len(self.network.body))]

    def cost_report(self) -> dict[str, float]:
        """MACs at 720p of the sparse path at each SMM's mean measured spatial density over the images of the
        last evaluation (the paper's convention; per pixel this is exactly what the sparse path executed;
        density 1 before any evaluation), and dense. Per-set values: :meth:`image_measurements`.
        With ``dense_masks`` both are the plain network's (no mask branches) and ``params`` excludes the masks."""
        if self.dense_masks:
            plain = plain_macs_720p(self.network)
            return {"params": float(deployed_params(self.network, with_masks=False)), "macs_720p": float(plain),
                    "macs_720p_dense": float(plain),
                    "spatial_density": 1.0}
        per_module = self._measured_densities or 1.0
        sparse, dense = analytic_macs_720p(self.network, per_module)
        density = sum(per_module) / len(per_module) if self._measured_densities else 1.0
        return {
            "params": float(deployed_params(self.network)),
            "macs_720p": float(sparse),
            "macs_720p_dense": float(dense),
            "spatial_density": density,
        }

    def on_checkpoint_loaded(self, checkpoint: dict[str, Any]) -> None:
        """Checks a converted official checkpoint's network arguments (pixel range!) against the config's."""
        needed = checkpoint.get("smsr_network")
        if not needed:
            return
        have = network_init_args(self.network)
        wrong = {key: (value, have.get(key)) for key, value in needed.items() if have.get(key) != value}
        if wrong:
            details = ", ".join(f"{key}={want} (config has {got})" for key, (want, got) in wrong.items())
            raise CheckpointError(
                f"the checkpoint ({checkpoint.get('converted_from', 'converted SMSR')}) needs an SMSR network with "
                f"{details}; set them under model.init_args.network.init_args (experiments/smsr_x{needed['scale']}"
                ".yaml matches the official weights)."
            )

    def on_eval_image(self, stage: str, set_name: str, name: str, lr: Tensor, sr: Tensor, hr: Tensor) -> None:
        """Logs the spatial masks of every SMM of the first evaluated image per set as one strip."""
        if (
            self.logger is None
            or not self.network.last_spatial
            or getattr(self, "_mask_logged", None) == (stage, set_name, self.global_step)
        ):
            return
        self._mask_logged = (stage, set_name, self.global_step)
        strip = torch.cat([mask[0, 0] for mask in self.network.last_spatial], dim=1)
        array = strip.mul(255).byte().unsqueeze(-1).expand(-1, -1, 3).cpu().numpy()
        log_image(
            self.logger,
            f"{stage}_masks/{set_name}",
            array,
            caption=f"{name}: spatial masks SMM 0..{len(self.network.last_spatial) - 1}",
            step=self.global_step,
        )
