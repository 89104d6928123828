"""What the ``effsr`` command does around LightningCLI: packaged experiment configs (listing, bare names),
composed recipes (a config's ``base:``, run names derived from recipe and scale), the overview ``effsr`` prints,
readable option errors, early checks of the checkpoint files a config names, and the CPU thread count.

Nothing here builds a model or a trainer, so these pieces are cheap to call before LightningCLI runs.
"""

from effsr.cli_support.checkpoint_paths import check_checkpoint_paths, member_training_command
from effsr.cli_support.configs import (
    BASE_KEY,
    PACKAGE_DIR,
    PACKAGED_CONFIGS,
    PACKAGED_EXPERIMENTS,
    composed_yaml,
    config_chain,
    experiment_dirs,
    packaged_config_names,
    read_config_file,
    recipe_lines,
    recipe_name,
    resolve_config,
    resolve_config_args,
    run_name_args,
)
from effsr.cli_support.option_errors import accepted_parameters, import_class, option_error_message
from effsr.cli_support.overview import DESCRIPTION, print_overview, print_recipes
from effsr.cli_support.threads import apply_thread_count

__all__ = [
    "BASE_KEY",
    "DESCRIPTION",
    "PACKAGED_CONFIGS",
    "PACKAGED_EXPERIMENTS",
    "PACKAGE_DIR",
    "accepted_parameters",
    "apply_thread_count",
    "check_checkpoint_paths",
    "composed_yaml",
    "config_chain",
    "experiment_dirs",
    "import_class",
    "member_training_command",
    "option_error_message",
    "packaged_config_names",
    "print_overview",
    "print_recipes",
    "read_config_file",
    "recipe_lines",
    "recipe_name",
    "resolve_config",
    "resolve_config_args",
    "run_name_args",
]
