"""What only a CUDA device can check (gpu tier; skipped without CUDA by tests/conftest.py): SMSR's sparse
execution equals the hard-mask forward on the GPU, N:M 2:4 semi-structured weights compute what the dense masked
weights compute, and a tiny fit under bf16 autocast."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def exact_cuda_float32() -> Iterator[None]:
    """TF32 off for convs and matmuls (cuDNN allows TF32 convs by default): the comparisons below are fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("scale", [2, 4])
def test_smsr_sparse_equals_hard_masks_on_cuda(scale: int, exact_cuda_float32: None,
                                              smsr_with_random_masks: Callable[[int], nn.Module]) -> None:
    """Random channel masks and spatial masks of mixed density: the sparse path (gathers, sparse convs, the
    per-block dense fallback) gives the hard-mask forward on CUDA, and the CPU's output."""
    network = smsr_with_random_masks(scale)
    with torch.no_grad():
        x = torch.rand(2, 3, 23, 17)
        on_cpu = network.forward_hard(x)
        network = network.cuda()
        hard, sparse = network.forward_hard(x.cuda()), network.forward_sparse(x.cuda())
    densities = [float(mask.float().mean()) for mask in network.last_spatial]
    assert any(0.0 < density < 1.0 for density in densities), densities
    assert sparse.device.type == "cuda" and sparse.shape == (2, 3, 23 * scale, 17 * scale)
    assert (hard - sparse).abs().max().item() <= 1e-4
    assert (hard.cpu() - on_cpu).abs().max().item() <= 1e-4


def _frozen_2to4_layer(channels: int) -> nn.Module:
    from effsr.methods.nm_sparsity import NMConv2d

    layer = NMConv2d(channels, channels, 1, bias=False, m=4)
    layer.freeze(2)
    return layer


def test_nm_2to4_semi_structured_weights_compute_the_dense_masked_product() -> None:
    """A frozen 2:4 1×1 layer exported by ``to_semi_structured_2to4`` holds exactly the masked weights (2 of every
    4 consecutive inputs kept), and its semi-structured matmul equals the dense masked fp16 matmul."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 semi-structured sparsity needs sparse tensor cores (sm80+)")
    from effsr.methods.nm_sparsity.convert import export_masked, to_semi_structured_2to4

    torch.manual_seed(0)
    channels = 128
    network = nn.Sequential(_frozen_2to4_layer(channels))
    masked = export_masked(network)[0].weight.detach().flatten(1)
    groups = (masked != 0).reshape(channels, channels // 4, 4).sum(-1)
    assert torch.equal(groups, torch.full_like(groups, 2))
    sparse = to_semi_structured_2to4(network)[0].weight
    assert type(sparse).__name__.startswith("SparseSemiStructuredTensor")
    dense = masked.cuda().half()
    assert torch.equal(sparse.to_dense(), dense)
    x = torch.randn(channels, 256, device="cuda", dtype=torch.half)
    reference = (dense.float() @ x.float())
    result = torch.mm(sparse, x).float()
    assert (result - reference).abs().max().item() <= 1e-2 * reference.abs().max().item()


def test_tiny_fit_under_bf16_autocast(tmp_path: Path) -> None:
    """The tiny EDSR config fits on CUDA with ``bf16-mixed``: its convs run in bf16, the weights stay fp32,
    every step is taken and the trained weights are finite and changed."""
    from effsr.cli import EffSRCLI

    cli = EffSRCLI(args=["--config", str(TESTS / "configs" / "tiny_edsr.yaml"), "--trainer.logger=false",
                         "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed",
                         "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                         f"--trainer.default_root_dir={tmp_path}"], run=False)
    model = cli.model
    before = {name: value.detach().clone() for name, value in model.network.state_dict().items()}
    first_conv = next(module for module in model.network.modules() if isinstance(module, nn.Conv2d))
    dtypes: list[torch.dtype] = []
    first_conv.register_forward_hook(lambda _module, _inputs, output: dtypes.append(output.dtype))
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == cli.trainer.max_steps
    assert dtypes and set(dtypes) == {torch.bfloat16}
    after = model.network.state_dict()
    assert all(value.dtype == before[name].dtype for name, value in after.items())
    assert all(bool(torch.isfinite(value).all()) for value in after.values())
    assert any(not torch.equal(after[name].cpu(), before[name]) for name in before if before[name].is_floating_point())
