"""``effsr data`` subcommands: ``download`` (DIV2K / Flickr2K) and ``prepare`` (build the array cache)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from effsr.errors import ConfigError

_PREPARE_HELP = """Builds the decoded-array cache of an experiment's data ahead of a run.

  effsr data prepare --config experiments/edsr_baseline_x4.yaml
  effsr data prepare --data.train div2k --data.data_root datasets --data.scale 4 --data.val_sets '[div2k_valid]'

--config reads the `data:` section of experiment YAMLs (later ones override earlier ones); --data.<option>
sets SRDataModule options (same names as in the YAML)."""


def add_data_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``data`` with its ``download`` / ``prepare`` subcommands to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="download data sets, build the data cache")
    commands = data.add_subparsers(dest="data_command", required=True)
    download = commands.add_parser("download", help="download and extract DIV2K or Flickr2K (resumable, verified)")
    download.add_argument("dataset", choices=["div2k", "flickr2k"])
    download.add_argument("--root", required=True, help="folder that receives DIV2K/ or Flickr2K/ (data.data_root)")
    download.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4],
                          help="DIV2K official bicubic LR scales to download (default: 2 3 4)")
    download.add_argument("--no-lr", action="store_true", help="DIV2K: HR only (LR is then generated and cached)")
    download.add_argument("--mirror", default=None, help="base URL of a mirror holding the same archive names")
    download.add_argument("--delete-archives", action="store_true", help="delete each archive once extracted")
    prepare = commands.add_parser("prepare", help="build the decoded-array cache of an experiment",
                                  description=_PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("--config", action="append", default=[], help="experiment YAML (repeatable)")
    prepare.add_argument("--stage", choices=["fit", "validate", "test", "all"], default="all",
                         help="which parts to cache: fit = train + val sets (default: all = train, val and test)")
    return data


def _data_section(path: str) -> dict[str, Any]:
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    from effsr.cli_support import composed_yaml

    content = composed_yaml(config_path)  # a per-scale config with its recipe (`base:`) merged in
    section = content.get("data", {}) if isinstance(content, dict) else {}
    if isinstance(section, dict) and "init_args" in section:
        section = section["init_args"]
    if not isinstance(section, dict):
        raise ConfigError(f"the data section of {path} must be a mapping of SRDataModule options")
    return section


def prepare_main(configs: list[str], overrides: list[str], stage: str) -> int:
    """Builds the cache of the SRDataModule described by ``configs`` and ``--data.*`` ``overrides``."""
    from jsonargparse import ArgumentParser

    from effsr.data.datamodule import SRDataModule

    parser = ArgumentParser(prog="effsr data prepare", exit_on_error=False)
    parser.add_class_arguments(SRDataModule, "data")
    argv = [item for path in configs for item in ("--data", yaml.safe_dump(_data_section(path)))]
    try:
        namespace = parser.parse_args(argv + overrides)
    except Exception as error:
        raise ConfigError(f"effsr data prepare: {error}") from error
    module = SRDataModule(**vars(namespace.data))
    start = time.perf_counter()
    module.build_cache(None if stage == "all" else stage)
    print(f"effsr data: cache ready in {module.cache.folder} ({time.perf_counter() - start:.1f} s)")
    return 0


def data_main(argv: list[str]) -> int:
    """Entry point of ``effsr data ...``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="effsr")
    add_data_subcommands(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(["data", *argv])
    if args.data_command == "download":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from effsr.data.download import download_dataset

        root = download_dataset(args.dataset, args.root, args.scales, lr=not args.no_lr, mirror=args.mirror,
                                keep_archives=not args.delete_archives)
        print(f"effsr data: {args.dataset} ready under {root} (use data.data_root: {root})")
        return 0
    unknown = [item for item in rest if item.startswith("--") and not item.startswith("--data.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (prepare takes --config and --data.<option>)")
    return prepare_main(args.config, rest, args.stage)


if __name__ == "__main__":
    sys.exit(data_main(sys.argv[1:]))
