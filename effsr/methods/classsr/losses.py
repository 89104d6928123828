"""ClassSR's losses: L_class (one-hot pressure) and L_avg (equal use of the classes over the global batch;
the module gathers the probabilities of all ranks with :func:`effsr.distributed.gather_with_grad`)."""

from __future__ import annotations

from torch import Tensor


def class_loss(probabilities: Tensor) -> Tensor:
    """L_class: negative summed pairwise |p_i - p_j| per sample (pushes probabilities to one-hot), batch mean."""
    differences = probabilities.unsqueeze(2) - probabilities.unsqueeze(1)
    return -differences.abs().sum(dim=(1, 2)).mean() / 2


def average_loss(probabilities: Tensor, normalized: bool = True) -> Tensor:
    """L_avg: sum over classes of |sum_batch p_i - B/K| (equal use of the classes over the batch).

    ``normalized`` divides by 4·B/K as the official code does; the paper weights (w3 = 3) refer to that form.
    """
    batch, num_classes = probabilities.shape
    target = batch / num_classes
    loss = (probabilities.sum(dim=0) - target).abs().sum()
    return loss / (4 * target) if normalized else loss

