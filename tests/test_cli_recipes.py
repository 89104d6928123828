"""Composed recipes: a config's ``base:`` put before it as a ``--config``, run names derived from recipe and scale
where the configs leave them unset, ``effsr recipes``, and a composed run's saved config.yaml loading again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from effsr.cli import main
from effsr.cli_support import PACKAGED_EXPERIMENTS, composed_yaml, config_chain, recipe_name
from effsr.errors import ConfigError

TINY = Path(__file__).parent / "configs" / "tiny_edsr.yaml"


def _printed(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    """The config ``effsr fit ARGS --print_config`` prints (a parse only: nothing is built)."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """tmp/recipes/tiny.yaml (the tiny EDSR without scale and run folders, a CSV logger) and tmp/tiny_x2.yaml on it."""
    base = yaml.safe_load(TINY.read_text())
    base["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"version": "v"}}
    del base["data"]["scale"]
    base["data"]["val_sets"] = ["sample", "unused"]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(base))
    overlay = tmp_path / "tiny_x2.yaml"
    overlay.write_text("base: recipes/tiny.yaml\ndata: {scale: 2, val_sets: [sample]}\n"
                       "model: {init_args: {network: {init_args: {num_features: 4}}}}\n")
    return overlay


@pytest.mark.integration
def test_overlay_composes_on_its_base_and_derives_the_run_name(recipe: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Base values stay, the overlay's win (a list replaced whole), names are runs/<recipe>_x<scale> unless set."""
    base = yaml.safe_load((recipe.parent / "recipes" / "tiny.yaml").read_text())
    printed = _printed(capsys, "--config", str(recipe))
    network = printed["model"]["init_args"]["network"]["init_args"]
    assert network["num_features"] == 4 and network["num_blocks"] == base["model"]["init_args"]["network"][
        "init_args"]["num_blocks"]
    assert printed["data"]["val_sets"] == ["sample"] and printed["data"]["scale"] == 2
    assert printed["trainer"]["max_steps"] == base["trainer"]["max_steps"]
    assert printed["trainer"]["default_root_dir"] == "runs/tiny_x2"
    logger = printed["trainer"]["logger"]["init_args"]
    assert (logger["name"], logger["save_dir"], logger["version"]) == ("tiny_x2", "runs/tiny_x2", "v")
    assert "base" not in printed  # a printed (or saved) config is complete without its base

    printed = _printed(capsys, "--config", str(recipe), "--data.scale", "3", "--trainer.default_root_dir", "elsewhere")
    assert printed["trainer"]["default_root_dir"] == "elsewhere"  # an option given wins
    assert printed["trainer"]["logger"]["init_args"]["name"] == "tiny_x3"  # the scale given
    recipe.write_text(recipe.read_text() + "trainer: {default_root_dir: out, logger: {init_args: {name: own}}}\n")
    printed = _printed(capsys, "--config", str(recipe))
    assert printed["trainer"]["default_root_dir"] == "out"
    assert printed["trainer"]["logger"]["init_args"]["name"] == "own"
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == "runs/tiny_x2"


@pytest.mark.integration
def test_paper_config_resolves_to_its_derived_names(capsys: pytest.CaptureFixture[str]) -> None:
    printed = _printed(capsys, "--config", "smsr_x4")
    assert printed["trainer"]["default_root_dir"] == "runs/smsr_x4"
    assert {key: printed["trainer"]["logger"]["init_args"][key] for key in ("project", "name", "save_dir")} == {
        "project": "effsr", "name": "smsr_x4", "save_dir": "runs/smsr_x4"}
    assert printed["data"]["lr_patch_size"] == 64 and printed["model"]["init_args"]["sparsity_weight"] == 0.1


@pytest.mark.e2e
def test_a_composed_runs_saved_config_loads_with_effsr_test(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`effsr fit` of the overlay writes a complete config.yaml under runs/tiny_x2; `effsr test --config` of it runs."""
    monkeypatch.chdir(recipe.parent)
    assert main(["fit", "--config", str(recipe), "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]) == 0
    run = recipe.parent / "runs" / "tiny_x2"
    (config,) = run.rglob("config.yaml")  # in the CSV logger's folder: save_dir/name/version
    assert config.parent == run / "tiny_x2" / "v"
    saved = yaml.safe_load(config.read_text())
    assert "base" not in saved and saved["model"]["init_args"]["network"]["init_args"]["num_features"] == 4
    (checkpoint,) = run.rglob("last.ckpt")
    assert main(["test", "--config", str(config), "--ckpt_path", str(checkpoint), "--trainer.logger=false"]) == 0
    assert json.loads((run / "test_results.json").read_text())["sample"]["n_images"] > 0


@pytest.mark.integration
def test_base_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: its base missing.yaml does not exist"):
        config_chain(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match=r"makes a cycle"):
        config_chain(tmp_path / "b.yaml")
    assert main(["fit", "--base", "c.yaml"]) == 2  # the key belongs in config files


@pytest.mark.integration
def test_composed_yaml_merges_like_repeated_configs(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model: {class_path: A, init_args: {x: 1, y: [1, 2]}}\ndata: {a: 1, b: 2}\n")
    (tmp_path / "over.yaml").write_text("base: base.yaml\nmodel: {init_args: {y: [3]}}\ndata: {b: 3}\n")
    assert composed_yaml(tmp_path / "over.yaml") == {"model": {"class_path": "A", "init_args": {"x": 1, "y": [3]}},
                                                     "data": {"a": 1, "b": 3}}
    (tmp_path / "other.yaml").write_text("base: base.yaml\nmodel: {class_path: B, init_args: {z: 0}}\n")
    assert composed_yaml(tmp_path / "other.yaml")["model"] == {"class_path": "B", "init_args": {"z": 0}}


@pytest.mark.integration
def test_recipes_lists_one_line_per_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = sorted({recipe_name(path) for path in PACKAGED_EXPERIMENTS.glob("*.yaml")})
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert expected == listed[:len(expected)] and len(expected) >= 15
    smsr = next(line for line in lines if line.split()[:1] == ["smsr"])
    assert smsr.split()[1:4] == ["x2", "x3", "x4"] and "SMSR" in smsr


@pytest.mark.e2e
def test_recipes_into_a_closed_pipe_exits_quietly() -> None:
    """`effsr recipes | head -1`: the reader is gone before effsr writes; no BrokenPipeError traceback."""
    process = subprocess.Popen([sys.executable, "-m", "effsr.cli", "recipes"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the interpreter has even imported effsr
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
