"""`suite train`: a checkpoint trained with the suite's plaintext recipe on a dataset."""

from __future__ import annotations

from pathlib import Path

from suite.config import RunConfig
from suite.data.catalog import load_dataset
from suite.model_source import recipe_for, train_small_densenet
from suite.models import DENSENET121, SMALL_DENSENET, save_checkpoint

ARCHITECTURES = {"small-densenet": SMALL_DENSENET, "densenet121": DENSENET121}


def train_checkpoint(cfg: RunConfig, out: Path, console, architecture: str = "small-densenet") -> Path:
    from rich.progress import Progress

    # training needs a training split, also when the config validates (split = "all") elsewhere
    cfg.dataset.split = "train-test"
    data, _ = load_dataset(cfg.dataset, cfg.seed)
    recipe = recipe_for(cfg.model, cfg.seed, quick=False)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=recipe.epochs)
        bundle = train_small_densenet(
            data, recipe, lambda e, loss: progress.update(task, completed=e + 1,
                                                          description=f"epoch {e + 1}: loss {loss:.3f}"),
            architecture=ARCHITECTURES[architecture])
    bundle.name = out.stem
    save_checkpoint(bundle, out, recipe={**recipe.__dict__, "architecture": architecture})
    return out
