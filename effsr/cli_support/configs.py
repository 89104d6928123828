"""Experiment config files: the packaged ones (listing, bare names such as ``smsr_x4``), composed recipes (a
config's ``base:`` chain) and the run name a composed config derives from its recipe and scale."""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from effsr.cli_support.option_errors import accepted_parameters, import_class
from effsr.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# The experiment configs shipped in the wheel; in a clone `effsr/experiments` links to the repository's experiments/.
PACKAGED_EXPERIMENTS = PACKAGE_DIR / "experiments"
PACKAGED_CONFIGS = PACKAGE_DIR / "configs"  # the demo's configs
_CONFIG_FLAGS = ("--config", "-c")

def experiment_dirs() -> list[Path]:
    """Folders whose YAML files ``effsr`` without arguments lists: ./experiments, then the packaged ones."""
    seen: list[Path] = []
    for candidate in (Path.cwd() / "experiments", PACKAGED_EXPERIMENTS, PACKAGED_CONFIGS):
        if candidate.is_dir() and candidate.resolve() not in [path.resolve() for path in seen]:
            seen.append(candidate)
    return seen


def packaged_config_names() -> list[str]:
    """Names (``smsr_x4``, ``tiny/smsr_x2``, ``trainer/ddp``) that ``--config`` accepts without a file."""
    names = []
    for folder in (PACKAGED_EXPERIMENTS, PACKAGED_CONFIGS):
        if folder.is_dir():
            names += [path.relative_to(folder).with_suffix("").as_posix() for path in folder.rglob("*.yaml")]
    return sorted(set(names))


def resolve_config(value: str) -> str:
    """``value`` when it is a file; else the packaged config of that name.

    ``smsr_x4``, ``smsr_x4.yaml`` and ``experiments/smsr_x4.yaml`` all name ``effsr/experiments/smsr_x4.yaml``, so
    the paths of the docs work from any folder with an installed effsr. Inline YAML (``--config '{...}'``) is
    passed through for jsonargparse.
    """
    if Path(value).is_file() or any(char in value for char in "{}:\n") or not value.strip():
        return value
    name = value.removeprefix("./").removeprefix("experiments/").removesuffix(".yaml")
    for folder in (PACKAGED_EXPERIMENTS, PACKAGED_CONFIGS):
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return str(candidate)
    close = difflib.get_close_matches(name, packaged_config_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"--config {value}: no such file and no packaged experiment '{name}'.{hint} "
                      "Run `effsr` without arguments to list the experiment configs.")


def resolve_config_args(argv: Iterable[str]) -> list[str]:
    """``argv`` with every ``--config X`` / ``--config=X`` / ``-c X`` value passed through :func:`resolve_config`,
    a composed config expanded into its chain (``--config recipes/smsr.yaml --config smsr_x4.yaml``, see
    :func:`config_chain`) and, when the first config is composed, the derived run name (:func:`run_name_args`)."""
    items = list(argv)
    resolved: list[str] = []
    chains: list[tuple[int, list[Path]]] = []  # (index in `resolved` of the chain's first --config, the chain)
    index = 0
    while index < len(items):
        item = items[index]
        flag, equals, value = item.partition("=")
        if flag == f"--{BASE_KEY}":
            raise ConfigError(f"--{BASE_KEY} is read from config files only (a top-level `{BASE_KEY}:` key); "
                              "give the base as a first --config instead")
        if item in _CONFIG_FLAGS and index + 1 < len(items):
            value, index = items[index + 1], index + 2
        elif equals and flag in _CONFIG_FLAGS:
            index += 1
        else:
            resolved.append(item)
            index += 1
            continue
        value = resolve_config(value)
        chain = config_chain(value) if Path(value).is_file() else [value]  # inline YAML is passed on as it is
        chains.append((len(resolved), [Path(path) for path in chain]))
        for path in chain:
            resolved += [f"{flag}={path}"] if equals else [flag, str(path)]
    return run_name_args(resolved, chains)


BASE_KEY = "base"
_SCALE_SUFFIX = re.compile(r"_x[0-9]+$")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of one config file ({} for an empty file); a ConfigError naming the file otherwise.

    One composition reads each file of a chain several times (its base, the scale, the logger, the run name), so
    the parse is cached per file version (path, modification time, size); callers get their own copy to change."""
    try:
        status = Path(path).stat()
        content = _parse_config_file(str(Path(path).resolve()), status.st_mtime_ns, status.st_size)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"config {path}: cannot be read as YAML ({error})") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"config {path}: expected a mapping of options, got {type(content).__name__}")
    return copy.deepcopy(content) if content else {}


@functools.lru_cache(maxsize=256)
def _parse_config_file(path: str, mtime_ns: int, size: int) -> Any:
    """The parsed YAML of ``path`` as it is at (``mtime_ns``, ``size``): the key of :func:`read_config_file`'s cache."""
    del mtime_ns, size  # only the cache key: a rewritten file is parsed again
    return yaml.safe_load(Path(path).read_text())


def config_chain(path: str | Path) -> list[Path]:
    """The files a config composes, root first, ending with ``path``: its ``base:`` (a path relative to the folder
    of the file naming it), that file's base, and so on. A config without ``base:`` is a chain of one.

    ``effsr`` passes the chain as repeated ``--config`` (LightningCLI's own merge: mappings key by key, lists and
    scalars replaced), so a per-scale file holds only what differs from its recipe."""
    chain = [Path(path)]
    while (base := read_config_file(chain[0]).get(BASE_KEY)) is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"config {chain[0]}: `{BASE_KEY}:` must be a file path, got {base!r}")
        parent = chain[0].parent / base
        if not parent.is_file():
            raise ConfigError(f"config {chain[0]}: its {BASE_KEY} {base} does not exist (looked for {parent}; a "
                              f"{BASE_KEY} is relative to the folder of the file that names it)")
        if parent.resolve() in [item.resolve() for item in chain]:
            raise ConfigError(f"config {chain[0]}: `{BASE_KEY}: {base}` makes a cycle "
                              f"({' -> '.join(str(item) for item in [parent, *chain])})")
        chain.insert(0, parent)
    return chain


def _merge(into: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``into`` as repeated --config merges: mappings key by key, anything else (lists,
    scalars) replaced; a different ``class_path`` replaces the whole node."""
    if "class_path" in over and over["class_path"] != into.get("class_path"):
        return dict(over)
    merged = dict(into)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def composed_yaml(path: str | Path) -> dict[str, Any]:
    """The plain YAML content of a config with its bases merged in (no defaults, no validation, ``base`` dropped):
    for code that reads one value of a config file (its data section, ``data.scale``). What runs is always
    LightningCLI's parse of the chain; tests/test_configs.py checks that both agree on every paper config."""
    content: dict[str, Any] = {}
    for item in config_chain(path):
        content = _merge(content, read_config_file(item))
    content.pop(BASE_KEY, None)
    return content


def recipe_name(config: str | Path) -> str:
    """``smsr`` for ``.../smsr_x4.yaml``: the file's stem without its ``_x<scale>`` suffix."""
    return _SCALE_SUFFIX.sub("", Path(config).stem)


def _given_scale(args: list[str], files: list[Path]) -> int | None:
    """data.scale as the arguments set it: the last config file setting it, then a later ``--data.scale``."""
    scale: Any = None
    for path in files:
        data = read_config_file(path).get("data") if path.is_file() else None
        scale = data["scale"] if isinstance(data, dict) and "scale" in data else scale
    for index, item in enumerate(args):
        if item == "--data.scale" and index + 1 < len(args):
            scale = args[index + 1]
        elif item.startswith("--data.scale="):
            scale = item.partition("=")[2]
    return int(scale) if str(scale).isdigit() else None


def _logger_options(path: Path) -> set[str]:
    """Of ``name`` / ``save_dir``, those the logger class that ``path`` sets accepts and ``path`` leaves unset."""
    logger = (read_config_file(path).get("trainer") or {}).get("logger")
    if not isinstance(logger, dict) or not isinstance(logger.get("class_path"), str):
        return set()
    cls = import_class(logger["class_path"])
    accepted = set(accepted_parameters(cls)) if cls else set()
    return {"name", "save_dir"} & accepted - set(logger.get("init_args") or {})


def run_name_args(args: list[str], chains: list[tuple[int, list[Path]]]) -> list[str]:
    """``args`` with the run name of a composed config filled in where the configs leave it unset.

    When the first config names a base, ``runs/<recipe>_x<scale>`` (:func:`recipe_name`, the scale the arguments
    set) becomes ``trainer.default_root_dir`` and, for a logger class taking them, the logger's ``name`` and
    ``save_dir``. They are given as options before the configs that could set them (default_root_dir before the
    first config, the logger's right after the file that picks the logger class), so any config or command-line
    option that sets them wins, as jsonargparse applies arguments in order."""
    if not chains or len(chains[0][1]) < 2:
        return args
    files = [path for _, chain in chains for path in chain]
    scale = _given_scale(args, files)
    if scale is None:
        return args
    name = f"{recipe_name(chains[0][1][-1])}_x{scale}"
    start, chain = chains[0]
    flag_width = 1 if args[start].startswith(("--config=", "-c=")) else 2
    result = list(args)
    for position, path in enumerate(chain):  # the first file of the chain that sets trainer.logger
        if "logger" in (read_config_file(path).get("trainer") or {}):
            values = {"name": name, "save_dir": f"runs/{name}"}
            insert_at = start + (position + 1) * flag_width
            result[insert_at:insert_at] = [f"--trainer.logger.init_args.{key}={values[key]}"
                                           for key in sorted(_logger_options(path))]
            break
    result[start:start] = [f"--trainer.default_root_dir=runs/{name}"]
    return result


def _description(path: Path, width: int) -> str:
    """The first comment line of a config file, shortened to ``width`` characters."""
    line = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#").lstrip("# ").strip()
    return line if len(line) <= width else line[: width - 1] + "…"


def recipe_lines(folder: Path) -> list[str]:
    """One line per recipe of ``folder``'s top-level configs (grouped by :func:`recipe_name`): the name, the scales
    and the first comment line of the recipe (the base the per-scale files name, else the file itself)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.yaml")):
        groups.setdefault(recipe_name(path), []).append(path)
    width = max(map(len, groups), default=0)
    lines = []
    for name, paths in sorted(groups.items()):
        scales = " ".join(path.stem[len(name) + 1:] for path in paths if path.stem != name)
        chain = config_chain(paths[0])
        about = _description(chain[-2] if len(chain) > 1 else chain[-1], max(40, 116 - width - 12))
        lines.append(f"{name:<{width}}  {scales:<8}  {about}")
    return lines
