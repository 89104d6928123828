"""SMSR (Wang et al., CVPR 2021): sparse-mask SR with Gumbel spatial/channel masks and real sparse inference.

Network module names follow the official state_dict layout (``sub_mean``, ``head``, ``body.k.spa_mask``,
``body.k.body.ch_mask``, ``body.k.body.body.i``, ``body.k.body.collect``, ``body.k.ca.conv_du``,
``collect``, ``tail``, ``add_mean``), so converting a released checkpoint is a key copy.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.checkpointing import atomic_torch_save, load_untrusted
from effsr.errors import CheckpointError
from effsr.models.base import SRModule, log_image

RGB_MEAN = (0.4488, 0.4371, 0.4040)


def gumbel_softmax(logits: Tensor, dim: int, tau: float) -> Tensor:
    """Soft Gumbel-softmax sample (no straight-through), as in the official code."""
    gumbels = -torch.empty_like(logits).exponential_().log()
    return ((logits + gumbels) / tau).softmax(dim)


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv adding (sign=+1) or subtracting (sign=-1) the DIV2K RGB mean times the pixel range."""

    def __init__(self, pixel_range: float, sign: int) -> None:
        super().__init__(3, 3, kernel_size=1)
        self.weight.data.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.bias.data.copy_(sign * pixel_range * torch.tensor(RGB_MEAN))
        for parameter in self.parameters():
            parameter.requires_grad = False


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


def _gemm_weight(weight: Tensor) -> Tensor:
    """(Cout, Cin, 3, 3) → (Cout, 9·Cin, 1, 1): a 1x1 kernel over pixel-major gathered rows ordered (ky, kx, cin)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * weight.shape[1], 1, 1).contiguous()


def _project(rows: Tensor, kernel: Tensor) -> Tensor:
    """``rows`` (P, K) times a (N, K, 1, 1) kernel → (P, N).

    On CPU the product runs as oneDNN's 1x1 convolution over the rows viewed as a channels_last (1, K, P, 1) map
    (a free view); it is 20-30 % faster than the BLAS GEMM at these shapes (K ≤ 576, N ≤ 64). Elsewhere (CUDA)
    it is a plain GEMM.
    """
    n_rows, depth = rows.shape
    if rows.device.type == "cpu" and n_rows and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        as_map = rows.view(1, n_rows, 1, depth).permute(0, 3, 1, 2)
        return F.conv2d(as_map, kernel).permute(0, 2, 3, 1).reshape(n_rows, kernel.shape[0])
    return rows @ kernel.view(kernel.shape[0], depth).t()


class SMB(nn.Module):
    """Sparse mask block: ``n_layers`` masked 3x3 convs (no bias) + ReLU, concatenated → 1x1 ``collect``."""

    def __init__(self, channels: int, n_layers: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.n_layers = n_layers
        self.ch_mask = nn.Parameter(torch.rand(1, channels, n_layers, 2))
        self.body = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(n_layers))
        self.collect = nn.Conv2d(channels * n_layers, channels, 1)
        self._plan: dict[str, Any] | None = None
        self._plan_key: tuple[int, ...] | None = None
        self.last_macs = 0

    def hard_channel_mask(self) -> Tensor:
        """(channels, n_layers) bool: True where the output channel is sparse."""
        return self.ch_mask[0, :, :, 1] > self.ch_mask[0, :, :, 0]

    def forward_masked(self, x: Tensor, spatial: Tensor, channel: Tensor) -> Tensor:
        """Training-rule forward. ``spatial`` (N,1,H,W); ``channel`` (1,C,L,2) with [dense, sparse] weights."""
        outputs = []
        feature = x
        for index, conv in enumerate(self.body):
            dense, sparse = channel[:, :, index : index + 1, :1], channel[:, :, index : index + 1, 1:]
            if index == 0:
                feature = conv(feature)
                feature = feature * sparse * spatial + feature * dense
            else:
                previous_dense = channel[:, :, index - 1 : index, :1]
                previous_sparse = channel[:, :, index - 1 : index, 1:]
                from_dense = conv(feature * previous_dense)
                from_sparse = conv(feature * previous_sparse)
                feature = (
                    from_dense * sparse * spatial
                    + from_dense * dense
                    + from_sparse * sparse * spatial
                    + from_sparse * dense * spatial
                )
            feature = F.relu(feature)
            outputs.append(feature)
        return self.collect(torch.cat(outputs, 1))

    def _weights_key(self) -> tuple[int, ...]:
        return tuple(v for p in self.parameters() for v in (p._version, p.data_ptr()))

    def plan(self) -> dict[str, Any]:
        """Kernel split by the hard channel masks, cached until a parameter changes."""
        key = self._weights_key()
        if self._plan is not None and self._plan_key == key:
            return self._plan
        with torch.no_grad():
            mask = self.hard_channel_mask()
            layers = []
            previous_dense = previous_sparse = None
            for index, conv in enumerate(self.body):
                dense_out = torch.nonzero(~mask[:, index]).squeeze(1)
                sparse_out = torch.nonzero(mask[:, index]).squeeze(1)
                weight = conv.weight
                layer: dict[str, Any] = {"dense_out": dense_out, "sparse_out": sparse_out}
                if index == 0:
                    layer["w_dd"] = weight[dense_out].contiguous()
                    layer["w_full_s"] = _gemm_weight(weight[sparse_out])
                else:
                    layer["w_dd"] = weight[dense_out][:, previous_dense].contiguous()
                    layer["w_ds"] = _gemm_weight(weight[sparse_out][:, previous_dense])
                    layer["w_s_all"] = _gemm_weight(weight[torch.cat([sparse_out, dense_out])][:, previous_sparse])
                layers.append(layer)
                previous_dense, previous_sparse = dense_out, sparse_out
            collect = self.collect.weight[:, :, 0, 0]
            offsets = [index * self.channels for index in range(self.n_layers)]
            dense_columns = torch.cat([layer["dense_out"] + off for layer, off in zip(layers, offsets, strict=True)])
            sparse_columns = torch.cat([layer["sparse_out"] + off for layer, off in zip(layers, offsets, strict=True)])
            self._plan = {
                "layers": layers,
                "collect_dense": collect[:, dense_columns].unsqueeze(-1).unsqueeze(-1).contiguous(),
                "collect_sparse": collect[:, sparse_columns, None, None].contiguous(),
                "collect_bias": self.collect.bias.detach().clone(),
            }
            self._plan_key = self._weights_key()
        return self._plan

    def forward_plain(self, x: Tensor) -> Tensor:
        """The block as an ordinary dense network (every channel everywhere): the dense baseline."""
        outputs = []
        feature = x
        for conv in self.body:
            feature = F.relu(conv(feature))
            outputs.append(feature)
        return self.collect(torch.cat(outputs, 1))

    def forward_sparse(self, x: Tensor, spatial: Tensor) -> Tensor:
        """Sparse execution with hard masks: dense channels via conv2d, sparse ones only at masked positions.

        Feature maps are channels_last, so a map's NHWC view is a free (B·H·W, C) matrix; each layer gathers
        the 3x3 windows of the masked positions pixel-major from it (out-of-image taps read a clamped pixel
        and are zeroed) into one workspace, the sparse channels of all layers live as column slices of one
        (N + 1, ΣC_s) matrix whose last row is the zero that out-of-mask neighbours read, and one GEMM per input
        kind (:func:`_project`) computes everything at masked positions.
        """
        plan = self.plan()
        batch, channels, height, width = x.shape
        pixels = batch * height * width
        x = x.contiguous(memory_format=torch.channels_last)
        positions = torch.nonzero(spatial.reshape(-1) > 0.5).squeeze(1)
        n_pos = positions.numel()
        image, rest = positions // (height * width), positions % (height * width)
        row, col = rest // width, rest % width
        steps = torch.tensor([-1, 0, 1], device=x.device)
        rows = (row[:, None] + steps[None, :])[:, :, None].expand(-1, 3, 3)
        cols = (col[:, None] + steps[None, :])[:, None, :].expand(-1, 3, 3)
        valid = ((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)).reshape(n_pos, 9)
        neighbours = (
            image[:, None] * (height * width)
            + (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).reshape(n_pos, 9)
        )
        outside = torch.nonzero(~valid.reshape(-1)).squeeze(1)
        compact = torch.full((pixels,), n_pos, dtype=torch.long, device=x.device)
        compact[positions] = torch.arange(n_pos, device=x.device)
        sparse_neighbours = compact[neighbours].masked_fill_(~valid, n_pos).reshape(-1)
        neighbours = neighbours.reshape(-1)
        macs = 0
        dense_maps: list[Tensor] = []
        sparse_widths = [layer["sparse_out"].numel() for layer in plan["layers"]]
        sparse_maps = x.new_empty(n_pos + 1, sum(sparse_widths))
        sparse_maps[n_pos].zero_()
        workspace = x.new_empty(n_pos * 9 * channels)
        sparse_offset = 0
        dense_in = x
        sparse_in: Tensor | None = None
        for index, layer in enumerate(plan["layers"]):
            n_dense, n_sparse = layer["dense_out"].numel(), layer["sparse_out"].numel()
            n_dense_in = dense_in.shape[1]
            n_sparse_in = 0 if sparse_in is None else sparse_in.shape[1]
            values = sparse_maps[:, sparse_offset : sparse_offset + n_sparse]
            sparse_offset += n_sparse
            at_positions = values[:n_pos]
            from_sparse = None
            if n_sparse_in:
                gathered = torch.index_select(
                    sparse_in, 0, sparse_neighbours, out=workspace[: n_pos * 9 * n_sparse_in].view(-1, n_sparse_in)
                ).view(n_pos, 9 * n_sparse_in)
                from_sparse = _project(gathered, layer["w_s_all"])
                macs += n_pos * 9 * n_sparse_in * (n_sparse + n_dense)
            if n_dense_in and n_sparse:
                gathered = torch.index_select(
                    dense_in.permute(0, 2, 3, 1).reshape(pixels, n_dense_in), 0, neighbours,
                    out=workspace[: n_pos * 9 * n_dense_in].view(-1, n_dense_in),
                )
                gathered.index_fill_(0, outside, 0.0)
                weight = layer["w_full_s"] if index == 0 else layer["w_ds"]
                from_dense = _project(gathered.view(n_pos, 9 * n_dense_in), weight)
                if from_sparse is None:
                    at_positions.copy_(from_dense)
                else:
                    torch.add(from_sparse[:, :n_sparse], from_dense, out=at_positions)
                macs += n_pos * 9 * n_dense_in * n_sparse
            elif from_sparse is not None:
                at_positions.copy_(from_sparse[:, :n_sparse])
            else:
                at_positions.zero_()
            if n_dense:
                if n_dense_in:
                    dense_out = F.conv2d(dense_in, layer["w_dd"], padding=1).contiguous(
                        memory_format=torch.channels_last
                    )
                    macs += pixels * 9 * n_dense_in * n_dense
                else:
                    dense_out = x.new_zeros(batch, n_dense, height, width).contiguous(
                        memory_format=torch.channels_last
                    )
                if from_sparse is not None:
                    dense_out.permute(0, 2, 3, 1).reshape(pixels, n_dense).index_add_(
                        0, positions, from_sparse[:, n_sparse:]
                    )
                dense_in = dense_out.relu_()
            else:
                dense_in = x.new_zeros(batch, 0, height, width)
            sparse_in = values.relu_() if n_sparse else None
            if n_dense:
                dense_maps.append(dense_in)
        if dense_maps:
            dense_cat = torch.cat(dense_maps, 1)
            output = F.conv2d(dense_cat, plan["collect_dense"], plan["collect_bias"])
            macs += pixels * dense_cat.shape[1] * channels
        else:
            output = plan["collect_bias"].view(1, -1, 1, 1).expand(batch, -1, height, width)
        output = output.contiguous(memory_format=torch.channels_last)
        if sparse_offset:
            output.permute(0, 2, 3, 1).reshape(pixels, channels).index_add_(
                0, positions, _project(sparse_maps[:n_pos], plan["collect_sparse"])
            )
            macs += n_pos * sparse_offset * channels
        self.last_macs = int(macs)
        return output


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
        self.scale = scale
        self.pixel_range = pixel_range
        self.tau = tau
        self.sparse_inference = True
        self.sub_mean = MeanShift(pixel_range, -1)
        self.add_mean = MeanShift(pixel_range, 1)
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

    def _run(self, x: Tensor, mode: str) -> Tensor:
        """Shared skeleton; ``mode`` in {"soft", "hard", "dense", "sparse"}."""
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
                body = module.body.forward_masked(feature, spatial, channel)
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

    def forward_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Soft-mask forward: SR and the sparsity term (mean over SMMs and layers of computed fraction)."""
        sr = self._run(x, "soft")
        return sr, torch.stack([d for module in self.last_densities for d in module]).mean()

    def forward_hard(self, x: Tensor) -> Tensor:
        """Training-rule forward with hard masks (the reference the sparse path must equal)."""
        return self._run(x, "hard")

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


def analytic_macs_720p(network: SMSR, spatial_density: float | list[float]) -> tuple[int, int]:
    """(sparse, dense) MACs for a 1280x720 output at the given spatial density (one for all SMMs or one per
    SMM) and the hard channel masks; the sparse count is what the sparse path executes per pixel."""
    lr_height, lr_width = {2: (360, 640), 3: (240, 426), 4: (180, 320)}[network.scale]
    pixels = lr_height * lr_width
    width = network.head[0].out_channels
    n_modules, n_layers = len(network.body), network.body[0].body.n_layers
    quarter = width // 4
    shared = 9 * 3 * width + 9 * width * width + width * n_modules * width + 9 * width * width
    shared += 9 * width * 3 * network.scale**2
    shared_per_module = 9 * width * quarter + 9 * quarter * quarter / 4 + 9 * quarter * 2
    dense = pixels * (
        shared + n_modules * (shared_per_module + n_layers * 9 * width * width + n_layers * width * width)
    )
    sparse = pixels * (shared + n_modules * shared_per_module)
    densities = (
        [float(spatial_density)] * n_modules if isinstance(spatial_density, (int, float)) else list(spatial_density)
    )
    for module, density in zip(network.body, densities, strict=True):
        counts = module.body.hard_channel_mask().sum(0).tolist()
        previous_sparse = 0
        for n_sparse in counts:
            n_dense = width - n_sparse
            previous_dense = width - previous_sparse
            layer_macs = 9 * previous_dense * n_dense + density * 9 * (
                previous_dense * n_sparse + previous_sparse * width
            )
            sparse += pixels * layer_macs
            sparse += pixels * width * (n_dense + density * n_sparse)
            previous_sparse = n_sparse
    return int(sparse), int(dense)


def plain_macs_720p(network: SMSR) -> int:
    """MACs for a 1280x720 output of the network run as a plain dense CNN without its mask branches."""
    _, dense = analytic_macs_720p(network, 1.0)
    lr_height, lr_width = {2: (360, 640), 3: (240, 426), 4: (180, 320)}[network.scale]
    quarter = network.head[0].out_channels // 4
    width = network.head[0].out_channels
    mask_branch = 9 * width * quarter + 9 * quarter * quarter / 4 + 9 * quarter * 2
    return int(dense - lr_height * lr_width * len(network.body) * mask_branch)


class SMSRModule(SRModule):
    """SMSR training/evaluation: L1 + λ·sparsity (linear warm-up), Gumbel τ from the ``tau`` schedule.

    Args:
        network: an :class:`SMSR`.
        sparsity_weight: λ after warm-up (paper 0.1).
        sparsity_warmup_steps: optimizer steps of the linear warm-up of λ (paper: 50 "epochs" of 1000 iterations).
        constant_tau: if set, τ stays at this value (official code behaviour: 1.0) and the schedule is ignored.
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
        dense_masks: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, *args, **kwargs)
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
        sr, sparsity = self.network.forward_train(lr)
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
            params = sum(p.numel() for name, p in self.network.named_parameters()
                         if ".spa_mask." not in name and not name.endswith("ch_mask")) - 2 * 12
            return {"params": float(params), "macs_720p": float(plain), "macs_720p_dense": float(plain),
                    "spatial_density": 1.0}
        per_module = self._measured_densities or 1.0
        sparse, dense = analytic_macs_720p(self.network, per_module)
        density = sum(per_module) / len(per_module) if self._measured_densities else 1.0
        params = sum(p.numel() for p in self.network.parameters()) - 2 * 12
        return {
            "params": float(params),
            "macs_720p": float(sparse),
            "macs_720p_dense": float(dense),
            "spatial_density": density,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checks a converted official checkpoint's network arguments (pixel range!) against the config's."""
        super().on_load_checkpoint(checkpoint)
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


def network_init_args(network: SMSR) -> dict[str, Any]:
    """The :class:`SMSR` constructor arguments that determine the state_dict layout and pixel range."""
    return {
        "scale": int(network.scale),
        "num_features": int(network.head[0].out_channels),
        "num_modules": len(network.body),
        "num_layers": int(network.body[0].body.n_layers),
        "pixel_range": float(network.pixel_range),
    }


def smsr_from_state_dict(state: dict[str, Tensor], pixel_range: float, source: str) -> SMSR:
    """An :class:`SMSR` shaped like ``state`` (official key layout; a DataParallel ``module.`` prefix is dropped).

    Width, module and layer counts and the scale are read from the tensor shapes; any other layout is refused
    with a message naming ``source``.
    """
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    if "head.0.weight" not in state or "body.0.body.ch_mask" not in state or "tail.0.weight" not in state:
        raise CheckpointError(
            f"{source} is not an SMSR state_dict (no `head.0.weight` / `body.0.body.ch_mask` / `tail.0.weight`)."
        )
    width = state["head.0.weight"].shape[0]
    n_modules = len({key.split(".")[1] for key in state if key.startswith("body.")})
    n_layers = state["body.0.body.ch_mask"].shape[2]
    scale = int(round(math.sqrt(state["tail.0.weight"].shape[0] / 3)))
    network = SMSR(scale=scale, num_features=width, num_modules=n_modules, num_layers=n_layers,
                   pixel_range=pixel_range)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: key layout differs from SMSR: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}."
            )
    network.load_state_dict({key: value.float() for key, value in state.items()})
    return network


def load_smsr_weights(path: str, pixel_range: float | None = None) -> SMSR:
    """An official SMSR state_dict (pixel range 255) or an effsr SMSR checkpoint as an eval-mode :class:`SMSR`.

    effsr checkpoints carry their pixel range when converted (``smsr_network``); for trained ones it defaults to
    255, the range of every SMSR config in ``experiments/``. ``pixel_range`` overrides both.
    """
    loaded = load_untrusted(path)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not an SMSR state_dict or effsr checkpoint.")
    state = loaded.get("state_dict", loaded)
    if any(key.startswith("network.") for key in state):
        state = {key.removeprefix("network."): value for key, value in state.items() if key.startswith("network.")}
    if pixel_range is None:
        pixel_range = float(loaded.get("smsr_network", {}).get("pixel_range", 255.0))
    return smsr_from_state_dict(state, pixel_range, path).eval()


def convert_official_checkpoint(src: str, dst: str, scale: int) -> None:
    """Converts an official SMSR state_dict (pixel range 255) into an effsr checkpoint, atomically.

    The result has the layout of effsr's own checkpoints (``state_dict`` with the ``network.`` prefix, the
    ``effsr`` phase state, no ``hyper_parameters`` — LightningCLI would merge those into the config) plus
    ``smsr_network``: the SMSR arguments it needs, checked against the config's network when it is loaded.
    """
    loaded = load_untrusted(src)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{src} is not an official SMSR state_dict (it holds a {type(loaded).__name__}).")
    network = smsr_from_state_dict(state, 255.0, src)
    if network.scale != scale:
        raise CheckpointError(f"{src} is a ×{network.scale} SMSR checkpoint, but --scale {scale} was given.")
    checkpoint = {
        "state_dict": {f"network.{key}": value.contiguous() for key, value in network.state_dict().items()},
        "effsr": {"phase_name": None, "phase_settings": {}, "schedule_values": {}, "structure": {}},
        "smsr_network": network_init_args(network),
        "converted_from": os.path.basename(src),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    atomic_torch_save(checkpoint, dst)
