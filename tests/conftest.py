"""Shared test set-up: one torch thread, one cache of the sample set per session, an environment free of the
user's W&B and launcher settings, the range check for PSNRs of short training runs, the test tiers, and the
fixtures several test files share (a code-running pickle, HR photo folders, W&B run summaries, SMSR with
random masks) and helpers they import (``from conftest import macs_720p_by_area``: MACs at 720p counted on
a small frame; import them inside a test, never at the top of a module that a subprocess child
imports, e.g. for a network class: importing this file strips launcher variables such as LOCAL_RANK).

Tiers (markers registered in pyproject.toml): every test carries exactly one of ``unit``, ``integration``, ``e2e``,
``ddp``, ``gpu``: a module-level ``pytestmark`` where a file is one tier, a decorator per test where it is mixed.
``gpu`` is the ``requires_cuda`` marker: without CUDA those tests are skipped here, with one reason. The fast
developer loop is ``pytest -m "not e2e and not ddp and not exhaustive"`` (``make test-fast``; ``exhaustive`` is not a
tier but marks a parametrised family's further members, e.g. a recipe's other scales); ``make test`` runs all."""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One intra-op thread per process unless the caller sets OMP_NUM_THREADS: on a busy 2-core machine the
# networks of the tests are so small that OpenMP's spin-waiting threads cost 5-20× the work (measured: a tiny
# SMSR training step 0.9 s on 1 thread vs 5.7-17 s on 2 under load). Set before torch is imported, so the
# CLI and DDP subprocesses of the tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ["OMP_NUM_THREADS"].isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also when torch was imported before this file

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="effsr-test-"))
(_SESSION_DIR / "cache").mkdir()
os.environ["EFFSR_CACHE"] = str(_SESSION_DIR / "cache")

# Settings of the user's shell that would change what the tests run: a launcher's rank/port/SLURM variables make
# Lightning join a foreign process group (or reuse a fixed port), W&B variables would pick a run id, a project,
# a server or a shared folder. The tests set what they need themselves.
_LAUNCHER = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
             "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
for _key in list(os.environ):
    if _key in _LAUNCHER or _key.startswith(("SLURM_", "WANDB_", "OMPI_COMM_WORLD_", "PMI_")):
        del os.environ[_key]
# W&B's own cache/config/artifact folders default to ~/.cache and ~/.config, shared with every other run.
for _key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ[_key] = str(_SESSION_DIR / "wandb" / _key.lower())


TIERS = ("unit", "integration", "e2e", "ddp", "gpu")
REQUIRES_CUDA = pytest.mark.skip(reason="needs a CUDA device (gpu tier; requires_cuda)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips the ``gpu`` tier without CUDA (requires_cuda) and warns about a test with no tier or several, so a
    test added without a marker shows up in the summary instead of landing in a tier by accident."""
    cuda = torch.cuda.is_available()
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            item.warn(pytest.PytestWarning(f"{item.nodeid}: needs exactly one tier marker of {TIERS}, has {tiers}"))
        if "gpu" in tiers and not cuda:
            item.add_marker(REQUIRES_CUDA)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freezes what imports and collection created (torch, Lightning, the test modules: alive all session) out of
    the garbage collector's generations, so each full collection during the tests no longer traverses it again
    (measured: about 10 % less CPU for a part of the fast tier). Garbage of the collection is collected first."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Removes the session's cache and W&B folders (each run of the suite starts from none)."""
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the same state whatever ran before it: fixed seeds (inputs drawn without a
    generator do not depend on the order or selection of tests), W&B offline (no upload, whatever credentials
    the machine has) and no seed or W&B service left in the environment by an earlier in-process run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    monkeypatch.setenv("WANDB_MODE", "offline")
    # WANDB_SERVICE (set by the first in-process run) would hand a subprocess's runs to this process's
    # wandb-core, which resolves relative save dirs in its own cwd (the repository root): files land there.
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "WANDB_SERVICE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def no_wandb_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment without W&B credentials (no key, no netrc), as on a fresh machine."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    return home


def _check_psnr(value: float) -> None:
    assert math.isfinite(value) and 0.0 < value < 100.0, value


@pytest.fixture
def assert_psnr_in_range() -> Callable[[float], None]:
    """The one PSNR check of a short end-to-end run: finite and in (0, 100) dB. What a few training steps
    learn differs between CPUs (kernels differ), so no test asserts a learned PSNR level."""
    return _check_psnr


class CodePickle:
    """A pickle payload whose unpickling runs a shell command that creates :attr:`marker`: a loader that allowed
    arbitrary code would run it (``weights_only=True`` refuses it). Pickle it as a value of a checkpoint dict."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))

    @property
    def ran(self) -> bool:
        """Whether some loader unpickled (ran) the payload."""
        return self.marker.exists()


@pytest.fixture
def code_pickle(tmp_path: Path) -> CodePickle:
    """The code-running payload of the loader-security tests, its marker ``tmp_path / "pwned"``."""
    return CodePickle(tmp_path / "pwned")


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """``tmp_path / "hr"`` with two 256×256 HR photographs (skimage's astronaut and coffee crops, ``a.png`` and
    ``b.png``): a training set of real texture small enough to score every sub-image."""
    from skimage import data

    from effsr.data.io import write_image

    folder = tmp_path / "hr"
    folder.mkdir()
    write_image(folder / "a.png", np.ascontiguousarray(data.astronaut()[:256, :256]))
    write_image(folder / "b.png", np.ascontiguousarray(data.coffee()[:256, 100:356]))
    return folder


def _wandb_summary(run_dir: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def wandb_summary() -> Callable[[Path], dict[str, Any]]:
    """Reads the summary of an offline W&B run folder (``wandb leet inspect``, a subprocess) as a dict."""
    return _wandb_summary


def macs_720p_by_area(network: torch.nn.Module, scale: int) -> int:
    """MACs of ``network`` for one 1280×720 output, counted by running the real modules (effsr.cost, no meta
    copy) on an LR frame of a tenth of the 720p frame's sides, times 100: exact for a network whose every layer
    costs the same per pixel (same-padded stride-1 convs, pixel shuffles), which is checked on a frame of twice
    those sides (4× the MACs). About 1 % of the compute of the 720p frame itself."""
    from effsr.cost import count_macs, lr_size_for_720p

    assert getattr(network, "scale", scale) == scale, f"the network upsamples by x{network.scale}, not x{scale}"
    height, width = lr_size_for_720p(scale)
    assert height % 10 == 0 and width % 10 == 0, f"the x{scale} 720p LR frame {height}x{width} is no 10x10 tiling"
    tenth = count_macs(network, torch.zeros(1, 3, height // 10, width // 10))
    assert count_macs(network, torch.zeros(1, 3, height // 5, width // 5)) == 4 * tenth, \
        f"{type(network).__name__}'s MACs are not proportional to the pixels"
    return 100 * tenth


def _smsr_with_random_masks(scale: int) -> torch.nn.Module:
    from effsr.methods.smsr import SMSR

    torch.manual_seed(scale)
    network = SMSR(scale=scale, num_features=32, num_modules=3).eval()
    with torch.no_grad():
        for module in network.body:
            module.body.ch_mask.normal_()
            module.spa_mask[5].bias.zero_()
    return network


@pytest.fixture
def smsr_with_random_masks() -> Callable[[int], torch.nn.Module]:
    """``build(scale)``: an SMSR (32 features, 3 modules, eval mode, seeded by ``scale``) whose channel-mask logits
    are random and whose spatial masks are unbiased, so channel and spatial densities are mixed (the sparse
    path's gathers, sparse convs and dense fallback all run). Draws after it continue the seeded stream."""
    return _smsr_with_random_masks


class RandomPatches(torch.utils.data.Dataset):
    """``length`` seeded uint8 LR/HR training pairs (HR 16×16, LR its 2× average pooling), as SRDataModule yields
    them: a data set for method tests that train a few steps through Lightning."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        hr = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(index))
        lr = torch.nn.functional.avg_pool2d(hr[None].float(), 2)[0].round().byte()
        return {"lr": lr, "hr": hr, "index": torch.tensor(index)}


@pytest.fixture
def random_patches() -> Callable[[int], RandomPatches]:
    """``make(length)``: :class:`RandomPatches` of that many ×2 pairs."""
    return RandomPatches
