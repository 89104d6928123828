"""EffSRCLI builds each kind of parser once per process (``EffSRCLI._parser_cache``) and a reused parser parses
like a fresh one, also after a parse that failed with ``--print_config`` requested."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from effsr.cli import EffSRCLI, main

pytestmark = pytest.mark.integration

TINY = Path(__file__).parent / "configs" / "tiny_edsr.yaml"


class _Parsed(Exception):
    """Raised in place of building the classes: the parse before it completed."""


def _printed(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(TINY), *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_reused_parser_after_failed_print_config_parses_like_a_fresh_one(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EffSRCLI, "_parser_cache", {})
    fresh = _printed(capsys, "--trainer.max_steps=7")
    assert len(EffSRCLI._parser_cache) == 1
    parser = next(iter(EffSRCLI._parser_cache.values()))[0]
    # --print_config is stored on the parser, then the bad option raises before it prints: the request lingers
    assert main(["fit", "--config", str(TINY), "--print_config", "--trainer.max_stepz=3"]) == 2
    assert "print_config" in vars(parser)
    # the next parse without --print_config parses (up to the build, stopped here) instead of printing and exiting
    def stop(_cli: EffSRCLI) -> None:
        raise _Parsed
    with monkeypatch.context() as patch:
        patch.setattr(EffSRCLI, "before_instantiate_classes", stop)
        with pytest.raises(_Parsed):
            EffSRCLI(args=["fit", "--config", str(TINY), "--trainer.max_steps=7"])
    assert capsys.readouterr().out == ""
    assert _printed(capsys, "--trainer.max_steps=7") == fresh
    assert _printed(capsys, "--trainer.max_steps=9")["trainer"]["max_steps"] == 9
    assert next(iter(EffSRCLI._parser_cache.values()))[0] is parser and len(EffSRCLI._parser_cache) == 1


def test_cache_key_separates_parsers_with_and_without_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EffSRCLI, "_parser_cache", {})
    args = ["--config", str(TINY), "--trainer.logger=false"]
    first = EffSRCLI(args=args, run=False)
    second = EffSRCLI(args=[*args, "--ckpt_path", "unused.ckpt"], run=False)  # an option only run=False accepts
    assert second.parser is first.parser and len(EffSRCLI._parser_cache) == 1
    assert second.model is not first.model
    key = first._parser_key(True, {}, {})
    assert key is not None and key not in EffSRCLI._parser_cache
