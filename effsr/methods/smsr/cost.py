"""SMSR's cost: MACs for a 1280x720 output at measured spatial densities, as the sparse path executes them."""

from __future__ import annotations

from effsr.archs.common import ConvMeanShift
from effsr.methods.smsr.network import SMSR


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


def deployed_params(network: SMSR, with_masks: bool = True) -> int:
    """Parameters the deployed network stores: every trained weight except the channel-mask logits (the
    deployed model keeps each layer's dense/sparse split as index lists, not the 2·C·L logits of
    ``ch_mask``) and the frozen mean shifts; ``with_masks=False`` also leaves out the spatial-mask branches
    (the network run all-dense never evaluates them)."""
    fixed = {id(parameter) for module in network.modules() if isinstance(module, ConvMeanShift)
             for parameter in module.parameters()}
    total = 0
    for name, parameter in network.named_parameters():
        if id(parameter) in fixed or name.endswith(".ch_mask"):
            continue
        if not with_masks and ".spa_mask." in name:
            continue
        total += parameter.numel()
    return total
