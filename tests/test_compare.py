"""`effsr compare` and the reproduction harness (benchmarks/reproduce.py) on tiny fabricated data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
import torch
import yaml
from bounded_run import run_bounded

from effsr.archs import EDSR
from effsr.cli import main
from effsr.compare import pareto_front, pareto_plot
from effsr.cost import count_params, macs_at_720p
from effsr.data.io import read_image, write_image
from effsr.metrics import psnr, ssim
from effsr.models import SRModule
from effsr.ops.imresize import imresize

TESTS = Path(__file__).parent
REPO = TESTS.parent
TINY = TESTS / "configs" / "tiny_edsr.yaml"


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def _fit_tiny(root: Path, name: str, seed: int) -> Path:
    """A 4-step tiny EDSR fit on the fabricated set (validation off); its last checkpoint."""
    code = main(["fit", "--config", str(TINY), "--trainer.logger=false", "--trainer.limit_val_batches=0",
                 f"--trainer.default_root_dir={root / name}", f"--seed_everything={seed}",
                 f"--data.train={root / 'fabset'}"])
    assert code == 0
    return root / name / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two smooth 48×64 HR images with their ×2 LR files (HR_DIR:LR_DIR), and ``run_a``, a 4-step EDSR
    checkpoint trained on them (seed 1)."""
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    for index in range(2):
        hr = np.stack([127 + 90 * np.sin(x / 6 + index), 127 + 90 * np.cos(y / 7), 127 + 50 * np.sin((x + y) / 9)], -1)
        hr = np.clip(hr + rng.normal(0, 4, hr.shape), 0, 255).astype(np.uint8)
        lr = imresize(_to_tensor(hr), scale=0.5).clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).numpy()
        write_image(root / "fabset" / f"img{index}.png", hr)
        write_image(root / "fabset_lr" / f"img{index}.png", lr)
    return {"hr": root / "fabset", "lr": root / "fabset_lr", "root": root, "run_a": _fit_tiny(root, "run_a", 1)}


@pytest.fixture(scope="module")
def fabricated(one_run: dict[str, Path]) -> dict[str, Path]:
    """:func:`one_run` and ``run_b``, a second 4-step EDSR checkpoint trained with another seed (seed 2); only
    the tests comparing two runs pay for it (the fast tier's error checks need one run)."""
    return {**one_run, "run_b": _fit_tiny(one_run["root"], "run_b", 2)}


def _expected(sr_of, paths: dict[str, Path]) -> tuple[float, float]:
    """Mean Y-PSNR/SSIM of ``sr_of(lr)`` over the fabricated set, computed here from the image files."""
    psnrs, ssims = [], []
    for hr_path in sorted(paths["hr"].glob("*.png")):
        hr, lr = _to_tensor(read_image(hr_path)), _to_tensor(read_image(paths["lr"] / hr_path.name))
        with torch.inference_mode():
            sr = sr_of(lr)
        psnrs.append(float(psnr(sr, hr, crop_border=2, y_channel=True)[0]))
        ssims.append(float(ssim(sr, hr, crop_border=2, y_channel=True)[0]))
    return float(np.mean(psnrs)), float(np.mean(ssims))


def _tiny_module(checkpoint: Path) -> SRModule:
    """The tiny EDSR of a checkpoint, built here from its run's config.yaml and its state dict."""
    config = yaml.safe_load((checkpoint.parents[1] / "config.yaml").read_text())
    network = config["model"]["init_args"]["network"]["init_args"]
    module = SRModule(EDSR(2, num_features=network["num_features"], num_blocks=network["num_blocks"]))
    module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    return module.eval()


@pytest.mark.e2e
def test_compare_evaluates_bicubic_and_checkpoints_with_one_protocol(
    fabricated: dict[str, Path], tmp_path: Path, no_wandb_credentials: Path, capsys: pytest.CaptureFixture[str],
    wandb_summary: Callable[[Path], dict]
) -> None:
    out = tmp_path / "out"
    test_set = f"{fabricated['hr']}:{fabricated['lr']}"
    code = main(["compare", "bicubic", f"first={fabricated['run_a']}", str(fabricated["run_b"]), "--scale", "2",
                 "--test_sets", f"[{test_set}]", "--output_dir", str(out), "--latency_repeats", "2",
                 "--logger", "wandb"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count(" CPU thread") == 1  # compare announces its thread count once, for all three models
    table = printed[printed.index("CPU ms ("):]
    assert all(name in table for name in ("bicubic", "first", "run_b", "fabset"))

    report = json.loads((out / "compare.json").read_text())
    assert [model["name"] for model in report["models"]] == ["bicubic", "first", "run_b"]
    assert report["latency"]["torch_threads"] == torch.get_num_threads() and report["latency"]["repeats"] == 2
    assert report["latency"]["hr_size"] == [720, 1280]
    models = {model["name"]: model for model in report["models"]}
    bicubic_psnr, bicubic_ssim = _expected(lambda lr: imresize(lr, scale=2).clamp(0, 1), fabricated)
    assert models["bicubic"]["sets"]["fabset"]["psnr_y"] == pytest.approx(bicubic_psnr, abs=1e-9)
    assert models["bicubic"]["sets"]["fabset"]["ssim_y"] == pytest.approx(bicubic_ssim, abs=1e-9)
    assert models["bicubic"]["params"] == 0
    for name, run in (("first", "run_a"), ("run_b", "run_b")):
        entry = models[name]
        module = _tiny_module(fabricated[run])
        expected_psnr, expected_ssim = _expected(module.super_resolve, fabricated)
        row = entry["sets"]["fabset"]
        assert row["n_images"] == 2
        assert row["psnr_y"] == pytest.approx(expected_psnr, abs=1e-6)
        assert row["ssim_y"] == pytest.approx(expected_ssim, abs=1e-6)
        assert row["macs_720p"] == entry["macs_720p"] == macs_at_720p(module.network, 2)
        assert row["params"] == entry["params"] == count_params(module.network)
        assert entry["latency_ms_720p"] > 0 and entry["checkpoint"] == str(fabricated[run].resolve())
    # different seeds -> different weights: each checkpoint's own weights were evaluated
    assert models["first"]["sets"]["fabset"]["psnr_y"] != models["run_b"]["sets"]["fabset"]["psnr_y"]

    image = cv2.imread(str(out / "pareto.png"))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    run_dir = Path(report["wandb_run"])
    assert run_dir.parent == out / "wandb" and run_dir.name.startswith("offline-run-")
    tables = list((run_dir / "files" / "media" / "table" / "compare").glob("table_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    assert [row[0] for row in logged["data"]] == ["bicubic", "first", "run_b"]
    summary = wandb_summary(run_dir)["summary"]
    assert summary["compare/table"]["nrows"] == 3 and summary["compare/pareto"]["format"] == "png"
    assert summary["compare/fabset/psnr_y_vs_gmacs_table"]["nrows"] == 3
    assert summary["first/fabset/psnr_y"] == pytest.approx(models["first"]["sets"]["fabset"]["psnr_y"])


@pytest.mark.integration
def test_compare_errors_name_the_problem(one_run: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--test_sets", f"[{one_run['hr']}]", "--output_dir", str(tmp_path)]
    assert main(["compare", str(one_run["run_a"]), "--scale", "4", *base]) == 2
    assert "is a ×2 model" in capsys.readouterr().err
    missing = tmp_path / "nope" / "last.ckpt"
    assert main(["compare", f"x={missing}", "--scale", "2", *base]) == 2
    assert f"checkpoint file {missing} does not exist" in capsys.readouterr().err
    assert main(["compare", "bicubic", f"bicubic={one_run['run_a']}", "--scale", "2", *base]) == 2
    assert "two models are named 'bicubic'" in capsys.readouterr().err
    wider = tmp_path / "wider.yaml"
    wider.write_text((one_run["run_a"].parents[1] / "config.yaml").read_text()
                     .replace("num_features: 8", "num_features: 12"))
    assert main(["compare", f"{one_run['run_a']}@{wider}", "--scale", "2", *base]) == 2
    assert "does not fit the network" in capsys.readouterr().err
    assert not (tmp_path / "compare.json").exists()


@pytest.mark.unit
def test_pareto_front_and_opencv_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    points = [("a", 1.0, 30.0), ("b", 0.1, 28.0), ("c", 2.0, 29.0), ("d", 5.0, 31.0), ("e", 0.0, 27.0)]
    assert [name for name, _, _ in pareto_front(points)] == ["e", "b", "a", "d"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    path = tmp_path / "plot.png"
    assert pareto_plot({"setA": points, "setB": points[:2]}, path, "title") == "cv2"
    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] == 2 * 560
    assert (image < 128).any()  # something was drawn


def _load_harness(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


@pytest.mark.unit
def test_reproduce_summary_reports_mean_sd_and_whether_the_gap_exceeds_the_spread() -> None:
    report = _load_harness("_reproduce_report")

    def entry(name: str, seed: int | None, value: float) -> dict:
        return {"name": name, "role": "method" if name == "m" else "baseline", "seed": seed, "macs_720p": 1e9,
                "params": 1e3, "latency_ms_720p": 5.0, "sets": {"S": {"psnr_y": value, "ssim_y": 0.9, "n_images": 4}}}

    summary = report.aggregate([entry("m", 0, 30.0), entry("m", 1, 30.2), entry("m", 2, 30.4), entry("b", None, 29)])
    assert summary["m"]["n_seeds"] == 3 and summary["m"]["sets"]["S"]["psnr_y_mean"] == pytest.approx(30.2)
    assert summary["m"]["sets"]["S"]["psnr_y_sd"] == pytest.approx(0.2)
    assert summary["b"]["sets"]["S"]["psnr_y_sd"] is None
    assert "effect shown" in report.reading(("m", "b"), summary)[0]
    assert "1.20 dB PSNR-Y above b" in report.reading(("m", "b"), summary)[0]
    close = report.aggregate([entry("m", 0, 29.0), entry("m", 1, 29.4), entry("b", None, 29.1)])
    assert "effect not shown" in report.reading(("m", "b"), close)[0]
    # a data-dependent cost: each set's own GMACs (mean over seeds) in its row, the model's where a set has none
    routed = [entry("m", seed, 30.0) for seed in (0, 1)]
    for item, (flat, busy) in zip(routed, ((1e9, 3e9), (2e9, 4e9)), strict=True):
        row = item["sets"]["S"]
        item["sets"] = {"flat": {**row, "macs_720p": flat}, "busy": {**row, "macs_720p": busy}}
    table = report.format_markdown_table(report.aggregate([*routed, entry("b", None, 29)]))
    assert "| m | method | 2 | flat | 4 | 30.00 ± 0.00 | 0.9000 ± 0.0000 | 1.500 |" in table
    assert "| m | method | 2 | busy | 4 | 30.00 ± 0.00 | 0.9000 ± 0.0000 | 3.500 |" in table
    assert "| b | baseline | 1 | S | 4 | 29.00 | 0.9000 | 1.000 |" in table


@pytest.mark.unit
def test_reproduce_seed_checks_pair_the_seeds_and_flag_an_outlier_seed() -> None:
    report = _load_harness("_reproduce_report")

    def entry(name: str, seed: int, value: float) -> dict:
        return {"name": name, "seed": seed, "sets": {"S": {"psnr_y": value}}}

    # the baseline's seed 1 is undertrained: the method's mean looks 0.2 dB better than it is
    models = [entry("m", 0, 29.90), entry("m", 1, 29.92), entry("m", 2, 29.91),
              entry("b", 0, 29.95), entry("b", 1, 29.30), entry("b", 2, 29.96)]
    sentences = report.seed_checks(("m", "b"), models)
    assert sentences[0] == "S: m − b per seed (same seed of both) s0 -0.050, s1 +0.620, s2 -0.050 dB."
    assert len(sentences) == 2
    assert sentences[1].startswith("S: b seed 1 is 0.65 dB below its other seeds' mean (29.95 dB)")
    # ordinary spread is not an outlier; with two seeds none can be singled out
    steady = [entry("m", seed, 29.9 + 0.03 * seed) for seed in range(3)] + [entry("b", 0, 29.0), entry("b", 1, 29.8)]
    assert report.seed_checks(("m", "b"), steady) == ["S: m − b per seed (same seed of both) s0 +0.900, s1 +0.130 dB."]
    # an unseeded baseline (bicubic): nothing to pair
    assert report.seed_checks(("m", "b"), [entry("m", 0, 30.0), {"name": "b", "seed": None, "sets": {"S": {}}}]) == []


@pytest.mark.unit
def test_reproduce_claim_checks_read_the_bound_on_means_and_per_seed() -> None:
    report, experiments = _load_harness("_reproduce_report"), _load_harness("_reproduce_experiments")

    def entry(name: str, seed: int | None, value: float, macs: float | None, model_macs: float = 10.0) -> dict:
        return {"name": name, "seed": seed, "macs_720p": model_macs,
                "sets": {"S": {"psnr_y": value, "macs_720p": macs}}}

    bound = experiments.ClaimBound(0.1, 0.65, unchecked="the masks")
    # seed 0 meets both bounds; seed 1 loses too much PSNR; seed 2 saves too few MACs; the means meet both
    models = [entry("m", 0, 30.00, 5.0), entry("m", 1, 29.80, 6.0), entry("m", 2, 30.05, 7.0),
              entry("b", 0, 30.05, None), entry("b", 1, 29.95, None), entry("b", 2, 30.05, None)]
    sentences = report.claim_checks(("m", "b"), bound, models)
    assert sentences == [
        "Claim on S (m at most 0.1 dB below b at ≤ 65 % of its MACs): seed means -0.067 dB at 60.0 % of the MACs, "
        "met; per seed met by 1 of 3 (s0).",
        "Not checked here: the masks."]
    # an unseeded baseline pairs with every seed; no MAC bound reads PSNR only; no bound, no sentences
    unseeded = [entry("m", 0, 30.0, None), entry("m", 1, 29.0, None), entry("b", None, 29.5, None)]
    assert report.claim_checks(("m", "b"), experiments.ClaimBound(0.2), unseeded) == [
        "Claim on S (m at most 0.2 dB below b): seed means +0.000 dB at 100.0 % of the MACs, met; per seed met by "
        "1 of 2 (s0)."]
    assert report.claim_checks(("m", "b"), None, models) == []


@pytest.mark.unit
def test_reproduce_cache_key_covers_a_configs_base_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = _load_harness("reproduce")
    experiments = _load_harness("_reproduce_experiments")
    monkeypatch.setattr(harness, "REPO", tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("trainer: {max_steps: 10}\n")
    (tmp_path / "plain.yaml").write_text("trainer: {max_steps: 10}\n")
    (tmp_path / "overlay.yaml").write_text("base: recipes/r.yaml\ndata: {scale: 2}\n")

    def key(config: str) -> str:
        return harness.cache_key(experiments.ModelDecl("m", "method", (experiments.FitStage(config),)), 0, ["sample"])

    stages = [{"config": "plain.yaml", "text": "trainer: {max_steps: 10}\n", "overrides": []}]
    content = json.dumps({"stages": stages, "seed": 0, "train": ["sample"]}, sort_keys=True)
    assert key("plain.yaml") == hashlib.sha256(content.encode()).hexdigest()  # no base: the key as before
    before = key("overlay.yaml")
    (tmp_path / "recipes" / "r.yaml").write_text("trainer: {max_steps: 20}\n")
    assert key("overlay.yaml") != before  # editing the recipe invalidates runs built on it


@pytest.mark.e2e
def test_reproduce_smoke_on_fresh_clone_defaults_then_cached(one_run: dict[str, Path], tmp_path: Path) -> None:
    """The harness end to end with its defaults (sample set), then a rerun on another test set: nothing trains."""
    work, docs = tmp_path / "work", tmp_path / "docs" / "reproduction.md"
    command = [sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "smoke", "--work-dir", str(work),
               "--docs", str(docs), "--latency-repeats", "1"]
    first = run_bounded(command, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((work / "smoke.json").read_text())
    assert result["time"]["trained_this_run"] == ["edsr_tiny-s0"] and result["train"] == ["sample"]
    assert {model["name"]: model["role"] for model in result["models"]} == {"edsr_tiny": "method",
                                                                           "bicubic": "baseline"}
    method = next(model for model in result["models"] if model["name"] == "edsr_tiny")
    assert method["seed"] == 0 and method["extra"]["global_step"] == 4
    assert method["sets"]["sample"]["n_images"] == 3 and method["macs_720p"] > 0
    text = docs.read_text()
    assert text.count("<!-- reproduce:smoke begin -->") == 1 and "| edsr_tiny | method | 1 | sample | 3 |" in text
    assert cv2.imread(str(docs.parent / "reproduction" / "smoke.png")) is not None
    marker = next((work / "runs" / "edsr_tiny").glob("seed0-*/stage0/finished.json"))
    stamp = marker.stat().st_mtime_ns, Path(method["checkpoint"]).stat().st_mtime_ns

    second = run_bounded([*command, "--test", str(one_run["hr"])], timeout=900, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "stage 0: cached" in second.stdout and "training (" not in second.stdout
    rerun = json.loads((work / "smoke.json").read_text())
    assert rerun["time"]["trained_this_run"] == [] and list(rerun["models"][0]["sets"]) == ["fabset"]
    assert (marker.stat().st_mtime_ns, Path(method["checkpoint"]).stat().st_mtime_ns) == stamp
    assert docs.read_text().count("<!-- reproduce:smoke begin -->") == 1


@pytest.mark.integration
def test_model_arguments_resolve_names_and_run_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from effsr.compare import parse_models

    run = tmp_path / "edsr_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {scale: 2}\n")
    for name in ("last.ckpt", "epoch=0-step=4.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    other = tmp_path / "other.yaml"
    other.write_text("data: {scale: 2}\n")
    monkeypatch.chdir(run / "checkpoints")
    specs = parse_models([str(run / "checkpoints" / "last.ckpt"), "epoch=0-step=4.ckpt", f"mine={other}",
                          f"x=last.ckpt@{other}", "BICUBIC"])
    assert [(spec.name, spec.kind) for spec in specs] == [
        ("edsr_run", "checkpoint"), ("edsr_run/epoch=0-step=4", "checkpoint"), ("mine", "config"),
        ("x", "checkpoint"), ("bicubic", "bicubic")]
    assert specs[0].configs == specs[1].configs == ((run / "config.yaml").resolve(),)
    assert specs[3].configs == (other.resolve(),)
    assert specs[3].checkpoint == (run / "checkpoints" / "last.ckpt").resolve()


@pytest.mark.unit
def test_compare_methods_page_keeps_the_hand_written_reading_and_names_the_fronts(tmp_path: Path) -> None:
    render = _load_harness("_compare_report")

    def record(model: str, set_name: str, psnr_y: float, gmacs: float, ms: float) -> dict:
        return {"scale": 2, "model": model, "experiment": "smsr_x2", "role": "method", "set": set_name,
                "n_images": 5, "psnr_y": psnr_y, "ssim_y": 0.9, "gmacs_720p": gmacs, "params": 2e3,
                "cpu_ms_720p": ms, "paper_cost_g": gmacs, "paper_cost_unit": "MACs@720p", "measured": True}

    # "slow" buys the best PSNR with the highest cost (on both fronts); "fast" beats "worse" on PSNR and both costs
    records = [record("bicubic", "S", 30.0, 0.0, 1.0), record("fast", "S", 31.0, 2.0, 10.0),
               record("slow", "S", 31.5, 8.0, 90.0), record("worse", "S", 30.8, 4.0, 20.0)]
    table = render.markdown_table(records)
    assert "| ×2 | fast | smsr_x2 | 31.00 / 0.9000 | 2.000 | 2.0K | 10 | 2 G MACs@720p |" in table
    (fact,) = render.facts(records)
    assert fact.startswith("×2 S: Pareto front by GMACs bicubic, fast, slow; by CPU ms bicubic, fast, slow.")
    assert "fast +1.00 dB = 0.500 dB/GMAC, 10.000 dB/100 ms" in fact and "worse" in fact
    docs = tmp_path / "comparison.md"
    result = {"command": "python benchmarks/compare_methods.py", "carried": {}, "test": ["S"], "cpu": "some CPU",
              "threads": 1, "latency_repeats": 1, "missing": [], "notes": [], "facts": [fact],
              "models": {2: [{"name": name, "experiment": "smsr_x2"} for name in ("fast", "slow")]}}
    render.write_docs(docs, records, result, [])
    assert "_To be written after looking at the numbers._" in docs.read_text()
    docs.write_text(docs.read_text().replace("_To be written after looking at the numbers._", "fast wins."))
    render.write_docs(docs, records, {**result, "facts": ["new fact"]}, [])
    text = docs.read_text()
    assert "<!-- reading begin -->\nfast wins.\n<!-- reading end -->" in text and "- new fact" in text
    assert table in text and "smsr_x2 (SMSR's released checkpoint and its main table are ×2)" in text
