"""SMSR's sparse mask block (SMB): the training-rule masked forward and the sparse execution with hard masks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Training-mode layer rules of :meth:`SMB.forward_masked`.
LAYER_RULES: tuple[str, ...] = ("fixed", "pre_fix")

#: Spatial density above which :meth:`SMB.forward_sparse` runs the block as dense convolutions
#: (:meth:`SMB.forward_dense_fallback`): there the gathers cost more than the skipped MACs save. Calibrated from
#: per-block CPU times (one thread) of the release's 25 Set5 ×2 blocks: gathers ahead up to density 0.58,
#: the fallback from 0.65 on (docs/benchmarks.md, SMSR section).
DENSE_ABOVE_DENSITY = 0.6


def _gemm_weight(weight: Tensor) -> Tensor:
    """(Cout, Cin, 3, 3) → (Cout, 9·Cin, 1, 1): a 1x1 kernel over pixel-major gathered rows ordered (ky, kx, cin)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * weight.shape[1], 1, 1).contiguous()


def _project(rows: Tensor, kernel: Tensor) -> Tensor:
    """``rows`` (P, K) times a (N, K, 1, 1) kernel → (P, N).

    On CPU the product runs as oneDNN's 1x1 convolution over the rows viewed as a channels_last (1, K, P, 1) map
    (a free view), called as ``torch.mkldnn_convolution`` directly: ``F.conv2d`` sends a batch-1 1x1 conv on one
    thread to its native GEMM path instead, 1.2-1.6× slower at these shapes (K ≤ 576, N ≤ 64, P in the
    thousands; docs/benchmarks.md, SMSR section), and MKL's GEMM is as slow. Elsewhere (CUDA) a plain GEMM.
    """
    n_rows, depth = rows.shape
    if (rows.device.type == "cpu" and n_rows and rows.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        as_map = rows.view(1, n_rows, 1, depth).permute(0, 3, 1, 2)
        product = torch.mkldnn_convolution(as_map, kernel, None, [0, 0], [1, 1], [1, 1], 1)
        return product.permute(0, 2, 3, 1).reshape(n_rows, kernel.shape[0])
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
        self.dense_above = DENSE_ABOVE_DENSITY
        self.last_path = "sparse"

    def hard_channel_mask(self) -> Tensor:
        """(channels, n_layers) bool: True where the output channel is sparse."""
        return self.ch_mask[0, :, :, 1] > self.ch_mask[0, :, :, 0]

    def forward_masked(self, x: Tensor, spatial: Tensor, channel: Tensor, layer_rule: str = "fixed") -> Tensor:
        """Training-rule forward. ``spatial`` (N,1,H,W); ``channel`` (1,C,L,2) with [dense, sparse] weights.

        ``layer_rule``: which channel masks split layer i's input (i > 0): ``"fixed"`` the previous layer's
        d_{i−1}/s_{i−1} (what the sparse path executes), ``"pre_fix"`` layer i's own d_i/s_i (the first
        official code, with which the released checkpoint was trained; docs/methods/smsr.md).
        """
        if layer_rule not in LAYER_RULES:
            raise ValueError(f"layer_rule must be one of {LAYER_RULES}, got {layer_rule!r}")
        lag = 1 if layer_rule == "fixed" else 0
        outputs = []
        feature = x
        for index, conv in enumerate(self.body):
            dense, sparse = channel[:, :, index : index + 1, :1], channel[:, :, index : index + 1, 1:]
            if index == 0:
                feature = conv(feature)
                feature = feature * sparse * spatial + feature * dense
            else:
                previous_dense = channel[:, :, index - lag : index - lag + 1, :1]
                previous_sparse = channel[:, :, index - lag : index - lag + 1, 1:]
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
            fallback = []
            previous_order, n_dense_in = torch.arange(self.channels, device=mask.device), self.channels
            for index, (conv, layer) in enumerate(zip(self.body, layers, strict=True)):
                order = torch.cat([layer["dense_out"], layer["sparse_out"]])
                sparse_in = previous_order[n_dense_in:]
                fallback.append({
                    "weight": conv.weight[order][:, previous_order].contiguous(),
                    "sparse_to_dense": conv.weight[layer["dense_out"]][:, sparse_in].contiguous()
                    if index and layer["dense_out"].numel() and sparse_in.numel() else None,
                    "n_dense": layer["dense_out"].numel(), "n_dense_in": n_dense_in,
                })
                previous_order, n_dense_in = order, layer["dense_out"].numel()
            order = torch.cat([torch.cat([layer["dense_out"], layer["sparse_out"]]) + off
                               for layer, off in zip(layers, offsets, strict=True)])
            self._plan = {
                "layers": layers,
                "fallback": fallback,
                "collect_fallback": collect[:, order, None, None].contiguous(),
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
            feature = conv(feature).relu_()
            outputs.append(feature)
        return self.collect(torch.cat(outputs, 1))

    def forward_dense_fallback(self, x: Tensor, spatial: Tensor) -> Tensor:
        """The hard-mask block (:meth:`forward_masked`, fixed rule) run as one dense C→C convolution per layer.

        Layer i's map holds its dense outputs D_i and sparse outputs S_i (zero outside the mask M, as the rule
        makes them) as channels [D_i | S_i]. With Y = conv([D_{i−1} | S_{i−1}], W) (output channels permuted
        the same way): S_i = relu(M·Y_S) and D_i = relu(Y_D − (1−M)·conv(S_{i−1}, W_sd)), since the rule adds
        the sparse inputs' share to the dense outputs only inside the mask. The correction is a conv with the
        few dense output channels (≤ 24 of 64 in the release), so a layer costs the plain layer's 9·C² MACs per
        pixel plus 9·C_s·C_d; the 1x1 collect reads the maps with its columns permuted accordingly. Reported MACs
        (``last_macs``) are what this executes.
        """
        plan = self.plan()
        mask = (spatial > 0.5).to(x.dtype)
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        feature = x
        maps: list[Tensor] = []
        macs = 0
        for layer in plan["fallback"]:
            n_dense, n_dense_in = layer["n_dense"], layer["n_dense_in"]
            output = F.conv2d(feature, layer["weight"], padding=1)
            macs += pixels * 9 * layer["weight"].shape[0] * layer["weight"].shape[1]
            if n_dense < output.shape[1]:
                output[:, n_dense:].mul_(mask)
            if layer["sparse_to_dense"] is not None:
                correction = F.conv2d(feature[:, n_dense_in:], layer["sparse_to_dense"], padding=1)
                output[:, :n_dense].sub_(correction.mul_(1.0 - mask))
                macs += pixels * 9 * layer["sparse_to_dense"].shape[0] * layer["sparse_to_dense"].shape[1]
            feature = output.relu_()
            maps.append(feature)
        self.last_macs = int(macs + pixels * self.n_layers * self.channels * self.channels)
        self.last_path = "dense"
        return F.conv2d(torch.cat(maps, 1), plan["collect_fallback"], plan["collect_bias"])

    def forward_sparse(self, x: Tensor, spatial: Tensor) -> Tensor:
        """Sparse execution with hard masks, or :meth:`forward_dense_fallback` when the mask's density exceeds
        ``dense_above`` (:data:`DENSE_ABOVE_DENSITY`); both equal :meth:`forward_masked` with hard masks."""
        if float((spatial > 0.5).sum()) > self.dense_above * spatial.numel():
            return self.forward_dense_fallback(x, spatial)
        self.last_path = "sparse"
        return self._forward_gathered(x, spatial)

    def _forward_gathered(self, x: Tensor, spatial: Tensor) -> Tensor:
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
