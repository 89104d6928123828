"""Every experiment config instantiates through effsr's CLI parser (``EffSRCLI(run=False)``): model, data module
and trainer are built in this one process, no image is read and no checkpoint file is needed (methods load the
files they start from in ``on_setup``, outside ``__init__``). A per-scale config composed on a recipe
(``base: recipes/...``) resolves to every value its files set and to the run name derived from its name."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import effsr.cli
from effsr.cli import EffSRCLI
from effsr.cli_support import composed_yaml, config_chain
from effsr.data import SRDataModule
from effsr.models import SRModule

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
# trainer overlays are added to a full config (as `--config X.yaml --config trainer/ddp.yaml` in the README)
OVERLAYS = {EXPERIMENTS / "trainer" / "ddp.yaml", EXPERIMENTS / "trainer" / "ddp_cpu.yaml"}
BASE_FOR_OVERLAY = EXPERIMENTS / "tiny" / "smsr_x2.yaml"
RECIPES = EXPERIMENTS / "recipes"  # bases of the per-scale configs, run through them
CONFIGS = sorted(path for path in EXPERIMENTS.rglob("*.yaml") if RECIPES not in path.parents)


def _class_path(node: dict[str, Any]) -> str:
    return node["class_path"] if "class_path" in node else node["init_args"]["class_path"]


@pytest.fixture(scope="module")
def instantiate() -> Callable[[list[str]], EffSRCLI]:
    """Builds model, data module and trainer of ``args`` (logger off). EffSRCLI builds its parser once per process
    and parses every config with it (``EffSRCLI._parser_cache``), so only the parse and the build are per config."""
    return lambda args: EffSRCLI(args=[*args, "--trainer.logger=false"], run=False)


def _is_within(declared: Any, resolved: Any) -> bool:
    """Every value ``declared`` sets is in ``resolved`` unchanged (mappings: per key, lists: item by item)."""
    if isinstance(declared, dict):
        return isinstance(resolved, dict) and all(key in resolved and _is_within(value, resolved[key])
                                                  for key, value in declared.items())
    if isinstance(declared, list):
        return isinstance(resolved, list) and len(declared) == len(resolved) and \
            all(_is_within(item, other) for item, other in zip(declared, resolved, strict=True))
    return declared == resolved


def test_every_config_is_covered() -> None:
    """The parametrisation below sees every YAML under experiments/ (paper, small, tiny, trainer overlays), and
    every recipe under experiments/recipes/ is the base of at least one of them."""
    assert len(CONFIGS) >= 40 and OVERLAYS <= set(CONFIGS)
    assert {path.parent.name for path in CONFIGS} == {"experiments", "small", "tiny", "trainer"}
    used = {item.resolve() for path in CONFIGS for item in config_chain(path)[:-1]}
    assert used == {path.resolve() for path in RECIPES.glob("*.yaml")}


def _config_cases() -> list[Any]:
    """Every config; a recipe's further scales (``x3``/``x4`` beside its first file: the same base chain and name
    but for the scale) are marked ``exhaustive``: the fast tier instantiates each recipe at one scale, the full
    suite every file."""
    seen: set[tuple[str, ...]] = set()
    cases = []
    for path in CONFIGS:
        chain = config_chain(path)
        family = (*(str(item) for item in chain[:-1]), re.sub(r"_x\d+$", "", path.stem))
        marks = [pytest.mark.exhaustive] if len(chain) > 1 and family in seen else []
        seen.add(family)
        cases.append(pytest.param(path, marks=marks, id=str(path.relative_to(EXPERIMENTS))))
    return cases


@pytest.mark.parametrize("path", _config_cases())
def test_config_instantiates_without_data_or_checkpoints(path: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         instantiate: Callable[[list[str]], EffSRCLI]) -> None:
    """Model of the declared class with data.scale linked into its network, SRDataModule, Trainer; run in an
    empty folder (no `datasets/`, no `runs/`), so nothing the config names on disk exists. The CLI's early
    missing-checkpoint check (tested in test_cli) is switched off: the module itself must not need the files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(effsr.cli, "check_checkpoint_paths", lambda *_args: None)
    if path in OVERLAYS:
        # the GPU overlay's accelerator is replaced so that the trainer can be built on a CPU machine
        extra = ["--trainer.accelerator=cpu", "--trainer.devices=2"] if path.name == "ddp.yaml" else []
        cli = instantiate(["--config", str(BASE_FOR_OVERLAY), "--config", str(path), *extra])
        assert cli.trainer.world_size == 2 and type(cli.trainer.strategy).__name__ == "DDPStrategy"
        return
    declared = composed_yaml(path)
    cli = instantiate(["--config", str(path)])
    model, data = cli.model, cli.datamodule
    assert isinstance(model, SRModule) and isinstance(data, SRDataModule)
    assert f"{type(model).__module__}.{type(model).__qualname__}" == _class_path(declared["model"]) or \
        type(model).__qualname__ == _class_path(declared["model"]).rsplit(".", 1)[-1]
    assert model.network.scale == data.scale == declared["data"]["scale"]
    assert not any(tmp_path.iterdir()), "instantiating a config wrote files"
    max_steps = declared.get("trainer", {}).get("max_steps")
    if max_steps is not None:
        assert cli.trainer.max_steps == max_steps
    if len(config_chain(path)) > 1:  # composed: what its files set, and runs/<file name> where they set no folder
        # what --print_config prints; the values were validated by the parse, so the dump does not check them again
        resolved = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_check=True))
        declared["trainer"].pop("logger", None)  # replaced by --trainer.logger=false here (test_cli_recipes.py)
        assert _is_within(declared, resolved)
        assert cli.trainer.default_root_dir == declared["trainer"].get("default_root_dir", f"runs/{path.stem}")
