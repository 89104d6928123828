"""SMSR's sparse block execution (issue 17): both paths of ``SMB.forward_sparse`` (gathers + oneDNN GEMMs at
the masked positions, and the dense fallback's one conv per layer + sparse→dense correction) equal the
hard-mask training rule for empty, full, random, border-only and single-pixel masks at odd sizes, and report
the MACs each executes, counted here from the channel and spatial masks."""

from __future__ import annotations

import pytest
import torch

from effsr.methods.smsr import SMB

CHANNELS, LAYERS = 16, 4


def _block() -> SMB:
    """An SMB with random weights and mixed channel masks; the last layer all sparse (as in the release)."""
    torch.manual_seed(11)
    block = SMB(CHANNELS, LAYERS).eval()
    with torch.no_grad():
        for conv in block.body:
            conv.weight.normal_(0.0, 0.2)
        block.ch_mask.normal_()
        block.ch_mask[0, :, LAYERS - 1, 1], block.ch_mask[0, :, LAYERS - 1, 0] = 1.0, 0.0
    return block


def _mask(kind: str, batch: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    mask = torch.zeros(batch, 1, height, width)
    if kind == "full":
        mask.fill_(1.0)
    elif kind == "random":
        mask = (torch.rand(batch, 1, height, width, generator=generator) < 0.4).float()
    elif kind == "border":  # only the outermost rows and columns: every window reads out-of-image taps
        mask[..., 0, :] = mask[..., -1, :] = mask[..., :, 0] = mask[..., :, -1] = 1.0
    elif kind == "single":
        mask[-1, 0, height - 1, width // 2] = 1.0
    return mask


def _hard_rule(block: SMB, x: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    sparse = block.hard_channel_mask().float()[None, :, :, None]
    return block.forward_masked(x, spatial, torch.cat([1 - sparse, sparse], 3), "fixed")


def _executed_macs(block: SMB, spatial: torch.Tensor, path: str) -> int:
    """What each path runs, from the masks: dense outputs everywhere, sparse products only at masked
    positions (gathers); or one C→C conv per layer + the sparse→dense correction convs (fallback)."""
    n_sparse = block.hard_channel_mask().sum(0).tolist()
    n_dense = [CHANNELS - n for n in n_sparse]
    pixels, n_pos = spatial.numel(), int(spatial.sum())
    if path == "dense":
        corrections = sum(9 * n_sparse[i - 1] * n_dense[i] for i in range(1, LAYERS))
        return pixels * (LAYERS * 9 * CHANNELS * CHANNELS + corrections + LAYERS * CHANNELS * CHANNELS)
    macs = 0
    dense_in, sparse_in = CHANNELS, 0
    for layer in range(LAYERS):
        macs += pixels * 9 * dense_in * n_dense[layer]
        macs += n_pos * 9 * (dense_in * n_sparse[layer] + sparse_in * CHANNELS)
        dense_in, sparse_in = n_dense[layer], n_sparse[layer]
    return macs + pixels * sum(n_dense) * CHANNELS + n_pos * sum(n_sparse) * CHANNELS


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["empty", "full", "random", "border", "single"])
@pytest.mark.parametrize("size", [(7, 9), (1, 6), (12, 5)])
def test_both_sparse_paths_equal_the_hard_mask_rule_and_count_what_they_run(kind: str,
                                                                            size: tuple[int, int]) -> None:
    block = _block()
    x = torch.randn(2, CHANNELS, *size).contiguous(memory_format=torch.channels_last)
    spatial = _mask(kind, 2, *size)
    with torch.no_grad():
        reference = _hard_rule(block, x, spatial)
        for dense_above, path in ((2.0, "sparse"), (-1.0, "dense")):
            block.dense_above = dense_above
            output = block.forward_sparse(x, spatial)
            assert block.last_path == path
            assert (output - reference).abs().max().item() <= 1e-4, (kind, size, path)
            assert block.last_macs == _executed_macs(block, spatial, path)


@pytest.mark.unit
def test_sparse_path_with_every_channel_dense_or_sparse_in_one_layer() -> None:
    """A layer with no dense outputs followed by one with no sparse outputs: the correction and the GEMMs
    meet empty channel sets on both sides."""
    block = _block()
    with torch.no_grad():
        block.ch_mask[0, :, 1, 1], block.ch_mask[0, :, 1, 0] = 1.0, 0.0
        block.ch_mask[0, :, 2, 1], block.ch_mask[0, :, 2, 0] = 0.0, 1.0
        x = torch.randn(1, CHANNELS, 9, 8)
        spatial = _mask("random", 1, 9, 8)
        reference = _hard_rule(block, x, spatial)
        for dense_above in (2.0, -1.0):
            block.dense_above = dense_above
            assert (block.forward_sparse(x, spatial) - reference).abs().max().item() <= 1e-4


def _benchmark_module():
    """benchmarks/smsr_inference.py imported from its file (benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "smsr_inference.py"
    spec = importlib.util.spec_from_file_location("smsr_inference_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_benchmark_parts_see_the_inputs_of_the_real_forwards() -> None:
    """`smsr_inference.py --parts` times each part on what it sees inside the forward: the tails built from
    the captured parts equal forward_sparse / forward_dense, each block's three paths agree on its captured
    input, and the listed densities are the masks the sparse forward used."""
    from effsr.methods.smsr import SMSR

    torch.manual_seed(3)
    network = SMSR(scale=2, num_features=CHANNELS, num_modules=2, pixel_range=255.0).eval()
    with torch.no_grad():
        for module in network.body:
            module.body.ch_mask.normal_()
    lr = torch.rand(1, 3, 11, 13) * 255
    with torch.inference_mode():
        for channels_last_dense in (False, True):
            timers, densities = _benchmark_module().part_timers(network, lr, channels_last_dense)
            sparse = network.forward_sparse(lr)
            assert densities == [float(mask.mean()) for mask in network.last_spatial]
            dense = network.forward_dense(lr)
            assert (timers["tail sparse"]() - sparse).abs().max().item() <= 1e-3
            assert (timers["tail dense"]() - dense).abs().max().item() <= 1e-3
            for index in range(2):
                block = timers[f"block {index}"]()
                assert (timers[f"gathered {index}"]() - block).abs().max().item() <= 1e-3
                assert (timers[f"fallback {index}"]() - block).abs().max().item() <= 1e-3
                assert set(timers) >= {f"mask {index}", f"plain {index}", f"ca{index} sparse", f"ca{index} dense"}
