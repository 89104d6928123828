"""Tests for ClassSR: classifier shape, losses, global-batch L_avg under 2-process gloo DDP."""
from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

from effsr.methods.classsr import Classifier, average_loss, class_loss, gather_with_grad


def test_classifier_outputs_logits_per_patch() -> None:
    logits = Classifier(num_classes=3)(torch.rand(5, 3, 32, 32))
    assert logits.shape == (5, 3)


def test_losses_prefer_one_hot_and_balance() -> None:
    one_hot = torch.eye(3)
    uniform = torch.full((3, 3), 1 / 3)
    assert class_loss(one_hot) < class_loss(uniform)
    assert torch.isclose(average_loss(one_hot), torch.tensor(0.0))
    assert average_loss(torch.tensor([[1.0, 0, 0]] * 3)) > 0


def _worker(rank: int, port: int, probabilities: torch.Tensor, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    local = probabilities.chunk(2)[rank].clone().requires_grad_(True)
    loss = average_loss(gather_with_grad(local))
    loss.backward()
    results[rank] = (loss.item(), local.grad.clone())
    torch.distributed.destroy_process_group()


def test_average_loss_uses_global_batch_under_ddp() -> None:
    torch.manual_seed(0)
    probabilities = torch.softmax(torch.randn(8, 3), dim=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, probabilities, results), nprocs=2, join=True)
    reference = probabilities.clone().requires_grad_(True)
    expected = average_loss(reference)
    expected.backward()
    for rank in range(2):
        assert abs(results[rank][0] - expected.item()) < 1e-5
        # all_gather's backward sums the grads of both ranks' (identical) losses; DDP's averaging then halves
        # them, so the parameter update equals the single-process one on the concatenated batch.
        assert torch.allclose(results[rank][1] / 2, reference.grad.chunk(2)[rank], atol=1e-6)


def test_phases_select_trainable_parameters() -> None:
    from effsr.archs import FSRCNN
    from effsr.methods.classsr import ClassSRModule, ClassSRNet

    net = ClassSRNet([FSRCNN(scale=4, num_features=n) for n in (16, 36, 56)])
    module = ClassSRModule(network=net)
    sr, probabilities = net(torch.rand(2, 3, 32, 32))
    assert sr.shape == (2, 3, 128, 128) and torch.allclose(probabilities.sum(1), torch.ones(2))
    assert module.on_phase_start("classifier", {})
    assert all(p.requires_grad for p in net.classifier.parameters())
    assert not any(p.requires_grad for p in net.branches.parameters())
