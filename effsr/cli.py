"""The ``effsr`` command: LightningCLI (fit/validate/test/predict) plus recipes, profile, compare, convert, data and
demo (each in its own module)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, ClassVar

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from effsr.checkpointing import EpochEndCheckpoint, use_atomic_checkpoints
from effsr.cli_support import (
    BASE_KEY,
    DESCRIPTION,
    PACKAGED_CONFIGS,
    apply_thread_count,
    check_checkpoint_paths,
    option_error_message,
    print_overview,
    print_recipes,
    resolve_config_args,
)
from effsr.console import quiet_known_noise
from effsr.convert import convert_main
from effsr.errors import ConfigError, EffSRError
from effsr.loggers import ensure_wandb_mode, finish_wandb_runs, log_config, prepare_loggers
from effsr.phases import PhaseProgressBar

PACKAGE_CONFIGS = PACKAGED_CONFIGS
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process killed by `kill <pid>`


class EffSRSaveConfig(SaveConfigCallback):
    """Saves the resolved config beside the run (overwriting, so re-runs in one folder work) and
    attaches it to the logger's run (W&B: the run's config and a ``config.yaml`` file)."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        log_config(trainer.loggers, self.parser.dump(self.config, skip_none=False))


# Keys a run's config.yaml holds for its subcommand (Trainer.fit/validate/test/predict arguments): a CLI built without
# subcommands (`effsr profile`, load_module_from_config) accepts them so that it reads that file as it is.
_RUN_CONFIG_KEYS: dict[str, Any] = {"ckpt_path": str | None, "weights_only": bool | None, "verbose": bool | None,
                                    "return_predictions": bool | None}

def _frozen(value: Any) -> Any:
    """``value`` with its dicts/lists/sets made tuples (hashable when their items are)."""
    if isinstance(value, dict):
        return tuple(sorted(((key, _frozen(item)) for key, item in value.items()), key=lambda pair: repr(pair[0])))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_frozen(item) for item in value)
    return value


def _clear_parse_state(parser: Any, subparsers: Any) -> None:
    """Drops what a parse can leave on a reused parser: the ``--print_config`` request jsonargparse stores on the
    root parser and removes only once it prints (a parse that failed after ``--print_config`` keeps it)."""
    for item in (parser, *subparsers):
        if "print_config" in vars(item):
            delattr(item, "print_config")


class EffSRCLI(LightningCLI):
    """LightningCLI with effsr's defaults: data.scale linked into the model, W&B offline fallback,
    atomic checkpoints, a last.ckpt every epoch, a progress bar that names the phase."""

    def __init__(self, args: list[str] | None = None, run: bool = True, announce_threads: bool = True) -> None:
        """``announce_threads=False``: a caller that already printed the ``[effsr] N CPU threads`` line (compare)."""
        from effsr.data import SRDataModule
        from effsr.models import SRModule

        self._announce_threads = announce_threads
        self._single_parser = not run  # no subcommands: a run's saved config.yaml still holds `ckpt_path`
        quiet_known_noise()
        super().__init__(
            SRModule,
            SRDataModule,
            subclass_mode_model=True,
            save_config_callback=EffSRSaveConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "use_distributed_sampler": False,
                "default_root_dir": "runs",
                "callbacks": [EpochEndCheckpoint(save_last=True), PhaseProgressBar()],
            },
            parser_kwargs={"description": DESCRIPTION, "formatter_class": argparse.RawDescriptionHelpFormatter},
            args=args,
            run=run,
            # Lightning's support dumps the whole config once more before the model is built, for
            # save_hyperparameters to store; effsr's modules never call it (a checkpoint holds no hyper_parameters,
            # the run's config.yaml is written by EffSRSaveConfig), so that dump was ~1/4 of every CLI start
            load_from_checkpoint_support=False,
        )
        if run:
            finish_wandb_runs()

    # Parsers built by setup_parser, per _parser_key: building the four subcommand parsers (the Trainer's,
    # SRModule's and SRDataModule's signatures) is ~0.2-0.6 s CPU per EffSRCLI, and a parser does not depend on
    # the arguments it parses, so one process (compare's runs, tests) builds each kind once.
    _parser_cache: ClassVar[dict[Any, tuple[Any, dict[str, Any], dict[str, list[str]]]]] = {}

    def _parser_key(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                    subparser_kwargs: dict[str, Any]) -> Any:
        """Everything setup_parser's result depends on, hashable; None (no caching) when some part is not."""
        trainer_defaults = {key: value for key, value in self.trainer_defaults.items() if key != "callbacks"}
        key = (type(self), self._model_class, self.subclass_mode_model, self._datamodule_class,
               self.datamodule_class is None, self.subclass_mode_data, self.trainer_class, self.parser_class,
               self.save_config_callback, self.seed_everything_default, self.auto_configure_optimizers,
               add_subcommands, self._single_parser, _frozen(main_kwargs), _frozen(subparser_kwargs),
               _frozen(trainer_defaults), os.environ.get("JSONARGPARSE_DEFAULT_ENV"))
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        """Lightning's parser setup, made once per :meth:`_parser_key` in a process and reused after."""
        key = self._parser_key(add_subcommands, main_kwargs, subparser_kwargs)
        cached = self._parser_cache.get(key) if key is not None else None
        if cached is None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            if key is not None:
                subparsers = getattr(self, "_subcommand_parsers", {}) if add_subcommands else {}
                methods = getattr(self, "_subcommand_method_arguments", {}) if add_subcommands else {}
                self._parser_cache[key] = (self.parser, dict(subparsers), {k: list(v) for k, v in methods.items()})
            return
        self.parser, subparsers, methods = cached
        if add_subcommands:
            self._subcommand_parsers = dict(subparsers)
            self._subcommand_method_arguments = {name: list(value) for name, value in methods.items()}
        _clear_parse_state(self.parser, subparsers.values())

    def init_parser(self, **kwargs: Any) -> Any:
        """Parsers that raise on a bad option (turned into one readable line by ``parse_arguments``) instead of
        printing the whole usage before jsonargparse's message."""
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parses ``args`` (None: sys.argv) with packaged config names resolved (``--config smsr_x4``); an unknown
        option raises a ConfigError naming its full name and the closest valid ones.

        Lightning warns when ``args`` is given while ``sys.argv`` is set; the arguments are always passed here
        (resolved), on purpose, so that warning is silenced."""
        if args is None or isinstance(args, (list, tuple)):
            args = resolve_config_args(sys.argv[1:] if args is None else args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within",
                                    module=r"lightning\.pytorch\.cli")
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as error:
                subcommand = next((item for item in args or [] if item in self.subcommands()), None)
                target = self._parser(subcommand) if subcommand and hasattr(self, "_subcommand_parsers") else parser
                names = [action.dest for action in target._actions if isinstance(action.dest, str)]
                raise ConfigError(option_error_message(str(error.message), subcommand, names)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with atomic checkpoint writes (whatever the plugins) and W&B loggers readied."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        prepare_loggers(trainer.loggers)
        return trainer

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.scale", "model.init_args.network.init_args.scale", apply_on="parse")
        parser.link_arguments("data.scale", "model.init_args.scale", apply_on="parse")
        parser.add_argument("--output_dir", type=str | None, default=None,
                            help="predict: folder for the SR PNGs (default: <default_root_dir>/predictions)")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="CPU threads of torch (default: OMP_NUM_THREADS when set, else torch's default)")
        # a composed config's `base:` key; resolve_config_args has already put the base before it as a --config,
        # so the key is accepted, unused and never dumped (a printed or saved config is complete without it)
        parser.add_argument(f"--{BASE_KEY}", type=str | None, default=None, help=argparse.SUPPRESS)
        if self._single_parser:  # the subcommands' own keys of a saved config.yaml, accepted and unused
            for key, kind in _RUN_CONFIG_KEYS.items():
                parser.add_argument(f"--{key}", type=kind, default=None,
                                    help="read from a run's config.yaml and not used (`effsr profile` has --ckpt_path)")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        apply_thread_count(config.get("threads"), announce=self._announce_threads)
        if config.get("trainer", {}).get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
            self.trainer_defaults["callbacks"] = [callback for callback in self.trainer_defaults["callbacks"]
                                                  if not isinstance(callback, PhaseProgressBar)]
        model = config.get("model")
        if model is not None and model.get("init_args") is not None:
            config_files = [str(path) for path in config.get("config") or []]
            check_checkpoint_paths(model.get("init_args"), config_files)
        loggers = config.get("trainer", {}).get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        if any("Wandb" in str(getattr(item, "class_path", item)) for item in loggers if item):
            ensure_wandb_mode()

    def _check_scales_match(self) -> None:
        model_scale = getattr(self.model, "scale", None)
        data_scale = getattr(self.datamodule, "scale", None)
        if model_scale is not None and data_scale is not None and int(model_scale) != int(data_scale):
            raise ConfigError(
                f"data.scale is {data_scale} but the model's network is ×{model_scale}; "
                "set the network's scale (model.init_args...scale) to data.scale."
            )

    def before_fit(self) -> None:
        self._check_scales_match()

    def before_validate(self) -> None:
        self._check_scales_match()
        self.config_init["validate"]["verbose"] = False  # SRModule prints one table per evaluation

    def before_test(self) -> None:
        self._check_scales_match()
        self.config_init["test"]["verbose"] = False  # SRModule prints one table per evaluation

    def before_predict(self) -> None:
        from effsr.inference.writer import SRImageWriter

        self._check_scales_match()
        config = self.config.get("predict", self.config)
        output_dir = config.get("output_dir") or os.path.join(self.trainer.default_root_dir, "predictions")
        if not any(isinstance(callback, SRImageWriter) for callback in self.trainer.callbacks):
            self.trainer.callbacks.append(SRImageWriter(output_dir))


def load_module_from_config(config_args: list[str], ckpt_path: str | None) -> Any:
    """Instantiates the model of an experiment config or of a run's own ``config.yaml``, and loads its checkpoint
    through the safe loader (:func:`effsr.weights.read_checkpoint`), structure first."""
    from effsr.weights import read_checkpoint, state_dict_of

    cli = EffSRCLI(args=[*config_args, "--trainer.logger=false"], run=False)
    model = cli.model
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path, "--ckpt_path")
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(state_dict_of(checkpoint, ckpt_path, "--ckpt_path"))
    else:  # the weights the config starts from (a checkpoint holds everything, its start files are not needed)
        model.on_setup("profile")
    return model.eval()


def main(args: list[str] | None = None) -> int:
    """Entry point of the ``effsr`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if not argv:
            print_overview()
            return 0
        command, rest = argv[0], argv[1:]
        if command == "recipes":
            print_recipes()
            return 0
        if command == "profile":
            from effsr.profile import profile_main

            return profile_main(rest)
        if command == "convert":
            return convert_main(rest)
        if command == "data":
            from effsr.data.cli import data_main

            return data_main(rest)
        if command == "demo":
            from effsr.demo import demo_main

            return demo_main(rest)
        if command == "compare":
            from effsr.compare import compare_main

            return compare_main(rest)
        EffSRCLI(args=None if args is None else argv)  # None: LightningCLI reads sys.argv itself
        return 0
    except EffSRError as error:
        print(f"effsr: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `effsr recipes | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SIGTERMException:  # Lightning stops the loops on SIGTERM with a SystemExit that would exit 0
        print("effsr: stopped by SIGTERM; the last checkpoint (last.ckpt) resumes with --ckpt_path last",
              file=sys.stderr)
        return SIGTERM_EXIT_CODE


if __name__ == "__main__":
    raise SystemExit(main())
