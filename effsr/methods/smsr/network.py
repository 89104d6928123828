"""SMSR (Wang et al., CVPR 2021): sparse-mask SR with Gumbel spatial/channel masks and real sparse inference.

Network module names follow the official state_dict layout (``sub_mean``, ``head``, ``body.k.spa_mask``,
``body.k.body.ch_mask``, ``body.k.body.body.i``, ``body.k.body.collect``, ``body.k.ca.conv_du``,
``collect``, ``tail``, ``add_mean``), so converting a released checkpoint is a key copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.archs.common import ConvMeanShift, check_positive, check_scale
from effsr.methods.smsr.block import SMB


def gumbel_softmax(logits: Tensor, dim: int, tau: float) -> Tensor:
    """Soft Gumbel-softmax sample (no straight-through), as in the official code."""
    gumbels = -torch.empty_like(logits).exponential_().log()
    return ((logits + gumbels) / tau).softmax(dim)


class CALayer(nn.Module):
    """Channel attention: global pool → 1x1 → ReLU → 1x1 → sigmoid, multiplied in."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class SMM(nn.Module):
    """Sparse mask module: SMM(x) = CA(SMB(x, spatial_mask(x))) + x."""

    def __init__(self, channels: int, n_layers: int = 4) -> None:
        super().__init__()
        self.spa_mask = nn.Sequential(
            nn.Conv2d(channels, channels // 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
            nn.Conv2d(channels // 4, channels // 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(channels // 4, 2, 3, stride=2, padding=1, output_padding=1),
        )
        self.body = SMB(channels, n_layers)
        self.ca = CALayer(channels)

    def spatial_logits(self, x: Tensor) -> Tensor:
        """2-channel [dense, sparse] logits at x's resolution (odd sizes: replicate-pad to even, crop)."""
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, width % 2, 0, height % 2), mode="replicate") if (height % 2 or width % 2) else x
        return self.spa_mask(padded)[..., :height, :width]

    def hard_spatial_mask(self, x: Tensor) -> Tensor:
        logits = self.spatial_logits(x)
        return (logits[:, 1:] > logits[:, :1]).to(x.dtype)


class SMSR(nn.Module):
    """SMSR network (plain nn.Module). ``forward``: soft Gumbel masks in training, sparse execution in eval.

    Args:
        scale: upscaling factor (2, 3 or 4).
        num_features: width (64 in the paper).
        num_modules: number of SMMs (5 in the paper).
        num_layers: masked 3x3 convs per SMM (4 in the paper).
        pixel_range: input/output range (255 for the official weights).
        tau: Gumbel-softmax temperature (set every step by the ``tau`` schedule).

    ``forced_spatial`` (list of (N,1,H,W) 0/1 masks per SMM) replaces the predicted spatial masks outside
    training (benchmarks that mimic a checkpoint's sparsity).
    """

    def __init__(
        self,
        scale: int = 2,
        num_features: int = 64,
        num_modules: int = 5,
        num_layers: int = 4,
        pixel_range: float = 1.0,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive(num_features=num_features, num_modules=num_modules, num_layers=num_layers,
                       pixel_range=pixel_range, tau=tau)
        self.scale = check_scale(scale)
        self.pixel_range = pixel_range
        self.tau = tau
        self.sparse_inference = True
        self.sub_mean = ConvMeanShift(pixel_range, -1)
        self.add_mean = ConvMeanShift(pixel_range, 1)
        self.head = nn.Sequential(
            nn.Conv2d(3, num_features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_features, num_features, 3, padding=1),
        )
        self.body = nn.ModuleList(SMM(num_features, num_layers) for _ in range(num_modules))
        self.collect = nn.Sequential(
            nn.Conv2d(num_features * num_modules, num_features, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_features, num_features, 3, padding=1),
        )
        self.tail = nn.Sequential(nn.Conv2d(num_features, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        self.last_densities: list[list[Tensor]] = []
        self.last_spatial: list[Tensor] = []
        self._last_macs: int | None = None
        self.forced_spatial: list[Tensor] | None = None

    def _run(self, x: Tensor, mode: str, layer_rule: str = "fixed") -> Tensor:
        """Shared skeleton; ``mode`` in {"soft", "hard", "dense", "sparse"}; ``layer_rule``: see
        :meth:`SMB.forward_masked` (soft and hard modes)."""
        x = self.sub_mean(x)
        head = self.head(x.contiguous(memory_format=torch.channels_last) if mode == "sparse" else x)
        feature = head
        module_outputs = []
        self.last_densities, self.last_spatial = [], []
        macs = 0
        for module_index, module in enumerate(self.body):
            if mode == "dense":
                feature = module.ca(module.body.forward_plain(feature)) + feature
                module_outputs.append(feature)
                continue
            logits = module.spatial_logits(feature)
            if self.forced_spatial is not None and mode != "soft":
                forced = self.forced_spatial[module_index].to(logits)
                logits = torch.cat([1 - 2 * forced, 2 * forced - 1], 1)
            if mode == "soft":
                spatial = gumbel_softmax(logits, 1, self.tau)[:, 1:]
                channel = gumbel_softmax(module.body.ch_mask, 3, self.tau)
            else:
                spatial = (logits[:, 1:] > logits[:, :1]).to(feature.dtype)
                sparse = module.body.hard_channel_mask().to(feature.dtype)[None, :, :, None]
                channel = torch.cat([1 - sparse, sparse], 3)
            if mode == "sparse":
                body = module.body.forward_sparse(feature, spatial)
                macs += module.body.last_macs
            else:
                body = module.body.forward_masked(feature, spatial, channel, layer_rule)
            spatial_mean = spatial.mean()
            self.last_spatial.append(spatial.detach())
            self.last_densities.append(
                [
                    spatial_mean * channel[0, :, layer, 1].mean() + channel[0, :, layer, 0].mean()
                    for layer in range(module.body.n_layers)
                ]
            )
            feature = module.ca(body) + feature
            module_outputs.append(feature)
        feature = self.collect(torch.cat(module_outputs, 1)) + head
        out = self.tail(feature) + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        self._last_macs = macs if mode == "sparse" else None
        return self.add_mean(out)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self._run(x, "soft")
        return self._run(x, "sparse" if self.sparse_inference else "hard")

    def forward_train(self, x: Tensor, layer_rule: str = "fixed") -> tuple[Tensor, Tensor]:
        """Soft-mask forward: SR and the sparsity term (mean over SMMs and layers of computed fraction)."""
        sr = self._run(x, "soft", layer_rule)
        return sr, torch.stack([d for module in self.last_densities for d in module]).mean()

    def forward_hard(self, x: Tensor, layer_rule: str = "fixed") -> Tensor:
        """Training-rule forward with hard masks (with the fixed rule: the reference the sparse path equals)."""
        return self._run(x, "hard", layer_rule)

    def forward_dense(self, x: Tensor) -> Tensor:
        """The same network run densely (every channel at every position, one plain conv per layer)."""
        return self._run(x, "dense")

    def forward_sparse(self, x: Tensor) -> Tensor:
        return self._run(x, "sparse")

    def sparse_channel_counts(self) -> list[list[int]]:
        """Number of sparse output channels per layer of each SMM."""
        return [module.body.hard_channel_mask().sum(0).tolist() for module in self.body]

    def train(self, mode: bool = True) -> SMSR:
        for module in self.body:
            module.body._plan = None
        return super().train(mode)
