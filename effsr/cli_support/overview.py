"""What ``effsr`` prints without a subcommand: the usage and the recipes of each experiments folder."""

from __future__ import annotations

from effsr.cli_support.configs import experiment_dirs, recipe_lines

DESCRIPTION = """effsr: efficient image super-resolution (ASSL, SLS N:M sparsity, SMSR, ClassSR) on PyTorch Lightning.

Train / evaluate:   effsr fit --config experiments/smsr_x4.yaml
                    effsr test --config experiments/smsr_x4.yaml --ckpt_path runs/.../last.ckpt
Resume a run:       effsr fit --config X.yaml --ckpt_path last
Multi-GPU:          effsr fit --config X.yaml --config experiments/trainer/ddp.yaml
Recipes:            effsr recipes   (experiments/<recipe>_x<scale>.yaml; --print_config shows one resolved)
Other commands:     effsr profile | compare | convert | data | demo   (each with --help)
"""


def print_recipes(others: bool = False) -> None:
    """One line per recipe (``effsr recipes``): its name, scales and what it is, for each experiments folder;
    ``others``: also a line per sub-folder of further configs (tiny/, small/, trainer/)."""
    for folder in experiment_dirs():
        lines = recipe_lines(folder)
        composed = (folder / "recipes").is_dir()
        print(f"Recipes in {folder} (effsr fit --config <recipe>_x<scale>):" if composed else f"Configs in {folder}:")
        print("\n".join(f"  {line}" for line in lines))
        subfolders = sorted(item for item in folder.iterdir() if item.is_dir() and item.name != "recipes")
        for sub in subfolders if others else []:
            names = sorted(path.relative_to(sub).with_suffix("").as_posix() for path in sub.rglob("*.yaml"))
            if names:
                print(f"  {sub.name}/: {' '.join(names)}")


def print_overview() -> None:
    """``effsr`` without arguments: the usage, the recipes and the other packaged configs."""
    print(DESCRIPTION)
    print_recipes(others=True)
    print("\nA packaged config can be given by name from any folder: effsr fit --config smsr_x4 "
          "(or tiny/smsr_x2, trainer/ddp).\nA per-scale file names its recipe (`base: recipes/<recipe>.yaml`); "
          "--print_config shows the whole resolved config.\nSee `effsr fit --help` for every option.")
