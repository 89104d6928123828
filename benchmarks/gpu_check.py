"""What CPU runs cannot measure, in one script for the few minutes a GPU is lent (under 8 min on one GPU).

    python benchmarks/gpu_check.py [--json runs/gpu_check.json] [--configs experiments/a.yaml ...]
    python benchmarks/gpu_check.py --smoke        # CPU, small sizes, seconds (tests/test_gpu_check.py)

Without a CUDA GPU it always runs the smoke version (so ``make bench`` stays short on CPU machines).

Figures (one printed line each, all collected in the JSON):

- ``smsr``: SMSR ×2 sparse execution vs the same network run densely on a 640×360 LR image (720p output);
  random weights with the released ×2 checkpoint's sparse channel counts and spatial masks thresholded from
  the image's edges to the released per-SMM densities (``benchmarks/smsr_inference.py``'s stand-in). The
  official sparse path is known to be slower than dense on GPUs; this measures effsr's.
- ``classsr``: ClassSR (MSRResNet 36/52/64) routed batched inference vs the official per-patch loop on a 2K
  frame, the classifier re-parameterised to send a third of the patches to each branch
  (``benchmarks/classsr_inference.py``'s setup); also the max difference of the two outputs.
- ``nm_2to4_w{64,256}``: a 3×3 conv of width C on a 320×180 LR map as its matmul (im2col columns × weight),
  dense fp16 vs the 2:4-masked weight as ``torch.sparse.to_sparse_semi_structured`` (CUDA sm80+ only).
- ``assl``: dense LEDSR F256 R16 ×4 vs the ASSL compact network keeping 49 filters
  (``effsr.methods.assl.prune_network``, as ``benchmarks/assl_speed.py``), eval, 320×180 LR.
- ``train/<config>/<precision>``: training throughput (it/s after warm-up steps, peak CUDA memory) of each paper
  config ``experiments/*.yaml`` for ``--steps`` optimizer steps, fp32 and bf16 autocast (``bf16-mixed``). The
  module, optimizer and phase schedule are built by effsr's CLI from the config (``EffSRCLI(run=False)``);
  the data module's loader is replaced by synthetic uint8 batches of the config's batch and patch size, so no
  data is read. The timed steps are the first phase's (e.g. ASSL's ``dense``, ClassSR's ``reference``); a ClassSR
  ``split_model`` is set to null (it only decides the data split). Parameter-free configs and configs that start
  from trained checkpoints (N:M adaptive's members) are skipped, with the reason.

Times are medians of ``--repeats`` runs after one warm-up, CUDA-synchronised. ``--smoke`` runs everything on
the CPU at small sizes; CUDA-only figures print ``skipped (no CUDA)`` there (their CPU-side code still runs).
A figure that fails is recorded with its error and the script goes on (``--strict``, implied by ``--smoke``
unless ``--keep-going``, stops instead). Exit status 1 when a figure failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from assl_speed import compact_ledsr  # noqa: E402
from classsr_inference import BACKBONES, balance_classifier, make_image, per_patch_loop  # noqa: E402
from smsr_inference import DENSITIES, build_network, edge_masks  # noqa: E402

from effsr.archs import LEDSR  # noqa: E402
from effsr.cli_support import composed_yaml  # noqa: E402
from effsr.cost import count_params, macs_at_720p  # noqa: E402
from effsr.errors import CheckpointError  # noqa: E402
from effsr.methods.classsr import ClassSRModule, ClassSRNet  # noqa: E402
from effsr.methods.smsr import analytic_macs_720p  # noqa: E402

Record = dict[str, Any]
SMOKE_CONFIGS = ("experiments/edsr_baseline_x4.yaml", "experiments/smsr_x2.yaml")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(function: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time [ms] of ``function()`` over ``repeats`` runs after one warm-up, in inference mode."""
    timings = []
    with torch.inference_mode():
        for run in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            function()
            _sync(device)
            if run:
                timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def check_smsr(device: torch.device, smoke: bool, repeats: int) -> Record:
    """SMSR ×2 sparse execution vs dense, same weights and masks."""
    network = build_network(None, None).to(device).eval()
    lr = make_image("coffee", *((96, 64) if smoke else (1280, 720)), scale=2)[0].to(device) * 255.0
    densities = [statistics.mean(values) for values in zip(*DENSITIES.values(), strict=True)]
    network.forced_spatial = edge_masks(lr, densities)
    with torch.inference_mode():
        difference = float((network.forward_sparse(lr) - network.forward_hard(lr)).abs().max())
    sparse_ms = median_ms(lambda: network.forward_sparse(lr), device, repeats)
    dense_ms = median_ms(lambda: network.forward_dense(lr), device, repeats)
    sparse_macs, dense_macs = analytic_macs_720p(network, densities)
    return {"lr_size": list(lr.shape[-2:]), "sparse_ms": sparse_ms, "dense_ms": dense_ms,
            "speedup_sparse_vs_dense": dense_ms / sparse_ms, "macs_ratio_dense_vs_sparse": dense_macs / sparse_macs,
            "max_abs_diff_sparse_vs_hard": difference, "spatial_densities": densities,
            "line": f"sparse {sparse_ms:.1f} ms vs dense {dense_ms:.1f} ms: speedup {dense_ms / sparse_ms:.2f}x "
                    f"(MACs ratio {dense_macs / sparse_macs:.2f}); |sparse-hard| {difference:.1e}"}


def check_classsr(device: torch.device, smoke: bool, repeats: int) -> Record:
    """ClassSR routed batched inference vs the official per-patch loop on one frame."""
    torch.manual_seed(0)
    backbone, widths, extra = BACKBONES["msrresnet"]
    network = ClassSRNet(backbone=backbone, widths=[8, 12, 16] if smoke else widths, scale=4,
                         backbone_args={**extra, "num_blocks": 1 if smoke else 16})
    module = ClassSRModule(network).eval()
    lr = make_image("coffee", *((384, 256) if smoke else (2040, 1080)))[0]
    shares = balance_classifier(module, lr).tolist()
    module = module.to(device)
    lr = lr.to(device)
    with torch.inference_mode():
        difference = float((module.route(lr).sr - per_patch_loop(module, lr)).abs().max())
    routed_ms = median_ms(lambda: module.route(lr), device, repeats)
    loop_ms = median_ms(lambda: per_patch_loop(module, lr), device, max(1, repeats // 2))
    return {"lr_size": list(lr.shape[-2:]), "routed_ms": routed_ms, "per_patch_ms": loop_ms,
            "speedup_routed_vs_per_patch": loop_ms / routed_ms, "class_shares": shares,
            "max_abs_diff_routed_vs_per_patch": difference,
            "line": f"routed {routed_ms:.1f} ms vs per-patch loop {loop_ms:.1f} ms: speedup "
                    f"{loop_ms / routed_ms:.2f}x; |routed-loop| {difference:.1e}"}


def mask_2to4(weight: Tensor) -> Tensor:
    """``weight`` (out, in) with the 2 smallest-magnitude of every 4 consecutive inputs zeroed."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    return torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape_as(weight)


def check_nm(device: torch.device, smoke: bool, repeats: int, width: int) -> Record:
    """A 3×3 conv of ``width`` channels as its im2col matmul: dense vs 2:4 semi-structured weight."""
    torch.manual_seed(0)
    height, span = (16, 16) if smoke else (180, 320)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(1, width, height, span, device=device, dtype=dtype)
    weight = mask_2to4(torch.randn(width, width * 9, device=device, dtype=dtype))
    columns = F.unfold(x, 3, padding=1)[0].t().contiguous()  # (H*W, 9C): the conv as one matmul
    reference = F.conv2d(x.float(), weight.float().view(width, width, 3, 3), padding=1)
    difference = float((F.linear(columns, weight).float().t().reshape_as(reference) - reference).abs().max())
    dense_ms = median_ms(lambda: F.linear(columns, weight), device, repeats)
    conv_ms = median_ms(lambda: F.conv2d(x, weight.view(width, width, 3, 3), padding=1), device, repeats)
    record: Record = {"width": width, "lr_size": [height, span], "dtype": str(dtype), "dense_matmul_ms": dense_ms,
                      "dense_conv_ms": conv_ms, "max_abs_diff_matmul_vs_conv": difference}
    if device.type != "cuda":
        record.update(status="skipped (no CUDA)", line=f"skipped (no CUDA); CPU dense matmul {dense_ms:.2f} ms, "
                                                       f"conv {conv_ms:.2f} ms, |matmul-conv| {difference:.1e}")
        return record
    from torch.sparse import to_sparse_semi_structured

    sparse = to_sparse_semi_structured(weight)
    sparse_difference = float((F.linear(columns, sparse) - F.linear(columns, weight)).abs().max())
    sparse_ms = median_ms(lambda: F.linear(columns, sparse), device, repeats)
    record.update(sparse_matmul_ms=sparse_ms, speedup_2to4_vs_dense=dense_ms / sparse_ms,
                  max_abs_diff_sparse_vs_dense=sparse_difference,
                  line=f"2:4 {sparse_ms:.3f} ms vs dense matmul {dense_ms:.3f} ms (conv {conv_ms:.3f} ms): speedup "
                       f"{dense_ms / sparse_ms:.2f}x; |2:4-dense| {sparse_difference:.1e}")
    return record


def check_assl(device: torch.device, smoke: bool, repeats: int) -> Record:
    """Dense LEDSR vs the ASSL compact network (keep 49 of 256, or 6 of 32 in the smoke run), eval."""
    torch.manual_seed(0)
    features, blocks, keep, size = (32, 2, 6, (24, 24)) if smoke else (256, 16, 49, (180, 320))
    dense = LEDSR(4, num_features=features, num_blocks=blocks, pixel_range=255.0).eval()
    compact = compact_ledsr(dense, keep).eval()
    macs = [macs_at_720p(network, 4) for network in (dense, compact)]
    dense, compact = dense.to(device), compact.to(device)
    image = torch.rand(1, 3, *size, device=device) * 255.0
    dense_ms = median_ms(lambda: dense(image), device, repeats)
    compact_ms = median_ms(lambda: compact(image), device, repeats)
    return {"features": features, "kept": keep, "lr_size": list(size), "dense_ms": dense_ms,
            "compact_ms": compact_ms, "speedup_compact_vs_dense": dense_ms / compact_ms,
            "macs_ratio_dense_vs_compact": macs[0] / macs[1], "params": [count_params(dense), count_params(compact)],
            "line": f"compact {compact_ms:.1f} ms vs dense {dense_ms:.1f} ms: speedup {dense_ms / compact_ms:.2f}x "
                    f"(MACs ratio {macs[0] / macs[1]:.2f})"}


class StepTimer(Callback):
    """Times optimizer steps after ``warmup`` steps (CUDA-synchronised) and the peak CUDA memory of the fit."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.stopped, self.steps = warmup, 0.0, 0.0, 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        _sync(pl_module.device)
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.started = now
        elif trainer.global_step > self.warmup:
            self.stopped, self.steps = now, trainer.global_step - self.warmup


def synthetic_batches(batch_size: int, lr_size: int, scale: int, steps: int) -> DataLoader:
    """A loader of ``steps`` training batches of random uint8 LR/HR patches (effsr's training batch layout)."""
    generator = torch.Generator().manual_seed(0)
    lr = torch.randint(0, 256, (batch_size, 3, lr_size, lr_size), generator=generator, dtype=torch.uint8)
    hr = torch.randint(0, 256, (batch_size, 3, lr_size * scale, lr_size * scale), generator=generator,
                       dtype=torch.uint8)
    batch = {"lr": lr, "hr": hr, "index": torch.arange(batch_size)}
    return DataLoader([batch] * steps, batch_size=None)  # already batched: no collation per step


def check_training(config: str, precision: str, device: torch.device, steps: int, smoke: bool) -> Record:
    """Throughput of ``steps`` training steps of ``config`` built by effsr's CLI, on synthetic batches."""
    from effsr.cli import EffSRCLI

    with tempfile.TemporaryDirectory() as folder:
        arguments = ["--config", str(REPO / config), "--trainer.logger=false", "--trainer.limit_val_batches=0",
                     "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
                     "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
                     f"--trainer.accelerator={device.type}", f"--trainer.precision={precision}",
                     f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={folder}",
                     "--trainer.enable_model_summary=false", "--data.num_workers=0"]
        if smoke:
            arguments += ["--data.batch_size=1", "--data.lr_patch_size=8"]
        model_args = (composed_yaml(REPO / config).get("model") or {}).get("init_args") or {}  # with its base
        if model_args.get("split_model"):  # ClassSR's split reference only decides the data split, not the step
            arguments.append("--model.init_args.split_model=null")
        try:
            cli = EffSRCLI(args=arguments, run=False)
        except CheckpointError as error:  # a pipeline that starts from trained members (N:M adaptive)
            first = str(error).strip().splitlines()[0]
            return {"config": config, "precision": precision, "status": "skipped (needs checkpoints)",
                    "error": first, "line": f"skipped (needs checkpoints): {first}"}
        if count_params(cli.model) == 0:
            return {"config": config, "precision": precision, "status": "skipped (no trainable parameters)",
                    "line": "skipped (no trainable parameters)"}
        data = cli.datamodule
        lr_size = data.hr_subimage_size // data.scale if data.train_crop == "grid" else data.lr_patch_size
        batches = synthetic_batches(data.batch_size, lr_size, data.scale, steps + 1)
        data.prepare_data = data.setup = lambda *_, **__: None  # no data is read: the loader below is the data
        data.train_dataloader = lambda: batches
        data.val_dataloader = lambda: []
        timer = StepTimer(warmup=min(5, steps - 1))
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=data)
        if timer.steps == 0:
            raise RuntimeError(f"no timed steps ({cli.trainer.global_step} optimizer steps ran)")
        seconds = timer.stopped - timer.started
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    phase = getattr(cli.model, "phase_name", None)
    del cli
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next config starts from an empty allocator
    return {"config": config, "precision": precision, "batch_size": data.batch_size, "lr_patch": lr_size,
            "phase": phase, "timed_steps": timer.steps, "it_per_s": timer.steps / seconds, "peak_mem_gib": memory,
            "line": f"{timer.steps / seconds:.2f} it/s (batch {data.batch_size}, LR {lr_size}, phase {phase})"
                    + (f", peak {memory:.2f} GiB" if memory is not None else "")}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's per-fit banners go to stderr only in --smoke; the figure lines stay on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run_figure(name: str, function: Callable[[], Record], strict: bool, records: list[Record]) -> None:
    """Runs one figure, prints its line and appends its record (an error is recorded unless ``strict``)."""
    start = time.perf_counter()
    try:
        with _quiet():
            record = function()
        record.setdefault("status", "ok")
    except Exception as error:  # noqa: BLE001  (one failing figure must not lose the others on a lent GPU)
        if strict:
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        record = {"status": "error", "error": f"{type(error).__name__}: {first}",
                  "traceback": traceback.format_exc(limit=4), "line": f"error: {type(error).__name__}: {first}"}
    record.update(name=name, seconds=time.perf_counter() - start)
    records.append(record)
    print(f"{name}: {record['line']}", flush=True)


FIRST_CONFIGS = ("smsr_x2", "classsr_fsrcnn_x4", "nm_edsr_baseline_x4", "assl_x4", "edsr_baseline_x4")


def paper_configs() -> list[str]:
    """The paper configs ``experiments/*.yaml`` (not tiny/, small/ or trainer overlays): one per method first,
    so that the time budget never leaves a method out, then the others by name."""
    names = sorted(str(path.relative_to(REPO)) for path in (REPO / "experiments").glob("*.yaml"))
    first = [name for name in names if Path(name).stem in FIRST_CONFIGS]
    return sorted(first, key=lambda name: FIRST_CONFIGS.index(Path(name).stem)) + [n for n in names if n not in first]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, small sizes, 2 configs, a few steps (seconds)")
    parser.add_argument("--json", default="runs/gpu_check.json", help="where the records go")
    parser.add_argument("--configs", nargs="+", default=None, help="training configs (default: experiments/*.yaml)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per config (default 50; smoke 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 10; smoke 1)")
    parser.add_argument("--train-budget-s", dest="train_budget_s", type=float, default=330.0,
                        help="no training run starts after this many seconds of training runs (rest: skipped)")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing figure (smoke default)")
    parser.add_argument("--keep-going", dest="keep_going", action="store_true",
                        help="record failing figures and go on, also with --smoke")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not args.smoke:
        print("gpu_check: no CUDA GPU, so the --smoke run (CPU, small sizes) instead of the full one", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    steps = args.steps or (2 if smoke else 50)
    repeats = args.repeats or (1 if smoke else 10)
    strict = (args.strict or smoke) and not args.keep_going
    configs = args.configs or (list(SMOKE_CONFIGS) if smoke else paper_configs())
    start = time.perf_counter()
    print(f"gpu_check: device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, smoke={smoke}", flush=True)
    records: list[Record] = []
    run_figure("smsr", lambda: check_smsr(device, smoke, repeats), strict, records)
    run_figure("classsr", lambda: check_classsr(device, smoke, repeats), strict, records)
    for width in (64, 256):
        run_figure(f"nm_2to4_w{width}", lambda width=width: check_nm(device, smoke, repeats, width), strict, records)
    run_figure("assl", lambda: check_assl(device, smoke, repeats), strict, records)
    train_start = time.perf_counter()
    for config in configs:
        for precision in ("32-true", "bf16-mixed"):
            name = f"train/{Path(config).stem}/{precision}"
            if time.perf_counter() - train_start > args.train_budget_s:
                records.append({"name": name, "status": "skipped (time budget)", "line": "skipped (time budget)"})
                print(f"{name}: skipped (time budget)", flush=True)
                continue
            run_figure(name, lambda config=config, precision=precision: check_training(
                config, precision, device, steps, smoke), strict, records)
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "torch": torch.__version__, "smoke": smoke,
              "steps": steps, "repeats": repeats, "seconds": time.perf_counter() - start, "figures": records}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    failed = [record["name"] for record in records if record["status"] == "error"]
    print(f"gpu_check: {len(records)} figures in {report['seconds']:.0f} s, {len(failed)} failed; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
