"""Turn `--model` into a ModelBundle, training and caching the default model when needed.

The parent process resolves the model once and hands workers a `model_ref` (a small
dict) so every backend process loads the identical weights. Torch loads only when a model is
built or read (inside the functions), so the CLI can refuse a bad invocation without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from suite.config import DatasetConfig, ModelConfig
from suite.data.imageset import ImageSet
from suite.errors import SuiteError
from suite.model_names import BUILTIN_MODELS  # noqa: F401  (re-exported)
from suite.paths import cache_dir

if TYPE_CHECKING:
    from suite.models import ModelBundle
    from suite.training import Recipe


def recipe_for(cfg: ModelConfig, seed: int, quick: bool) -> Recipe:
    from suite.training import Recipe

    return Recipe(epochs=max(1, cfg.epochs // 2) if quick else cfg.epochs,
                  batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)


def train_small_densenet(data: ImageSet, recipe: Recipe, progress=None,
                         role: str | None = None, architecture: dict | None = None) -> ModelBundle:
    """The suite's own plaintext model: same recipe as `suite train` and the training controls.
    It trains on `data`'s 'train' images; their ids and pixel hashes go into the bundle so any
    later run can check it never saw that run's hospital images."""
    import torch

    from suite.data.roles import image_hashes
    from suite.models import SMALL_DENSENET, ModelBundle, build_densenet
    from suite.training import train_logits_model

    train = data.split("train")

    torch.manual_seed(recipe.seed)      # the initial weights are part of the recipe
    arch = architecture or SMALL_DENSENET     # `suite train --architecture densenet121`: the study's
    net = build_densenet(arch, len(data.label_names)).train()
    bundle = ModelBundle(net=net, name="small-densenet", architecture=arch,
                         pathologies=list(data.label_names), resolution=data.resolution,
                         source="trained-on-the-fly", data_fingerprint=data.fingerprint(),
                         extra={"dataset": data.name, "data_role": role,
                                "train_image_ids": train.image_ids.tolist(),
                                "train_image_hashes": image_hashes(train),
                                "train_sites": sorted(set(train.sites.tolist()))})
    train_logits_model(bundle.logits, net.parameters(), train, list(range(len(data.label_names))),
                       recipe, on_epoch=progress)
    net.eval()
    return bundle


def resolve_model(cfg: ModelConfig, data: ImageSet, seed: int, quick: bool,
                  progress=None, dataset_cfg: DatasetConfig | None = None) -> tuple[ModelBundle, dict[str, Any]]:
    """The model for this run and a `model_ref` a worker process can load it from.

    `small-densenet` is the vendor model: trained on the vendor's own data only
    (`suite.data.roles.load_vendor_data`), never on `data`, the hospitals' images.
    """
    from suite.models import load_checkpoint, load_xrv_weights

    name = cfg.name
    if name == "small-densenet":
        return vendor_model(cfg, data, seed, quick, progress, dataset_cfg)
    if name == "small-densenet-untrained":
        ref = {"kind": "random", "architecture": "small", "pathologies": data.label_names,
               "resolution": data.resolution, "seed": seed}
        return load_model_ref(ref), ref
    if name == "densenet121-random":
        ref = {"kind": "random", "pathologies": data.label_names, "resolution": data.resolution,
               "seed": seed}
        return load_model_ref(ref), ref
    if name.startswith("xrv:"):
        return load_xrv_weights(name[4:]), {"kind": "xrv", "weights": name[4:]}
    if name.endswith(".pt") or Path(name).exists():
        bundle = load_checkpoint(Path(name))
        check_pathologies(bundle, data)
        check_no_leak(bundle, data, name, dataset_cfg.split if dataset_cfg else None)
        return bundle, {"kind": "checkpoint", "path": str(Path(name).resolve())}
    raise SuiteError(
        f"unknown model '{name}'; use one of {', '.join(BUILTIN_MODELS)}, xrv:<weights name>, "
        f"or a checkpoint path (.pt)")


def vendor_model(cfg: ModelConfig, data: ImageSet, seed: int, quick: bool, progress=None,
                 dataset_cfg: DatasetConfig | None = None) -> tuple[ModelBundle, dict[str, Any]]:
    """The suite's default model, trained with the plaintext recipe on the vendor's data only;
    cached by the vendor data's fingerprint and the recipe."""
    from suite.data.roles import load_vendor_data
    from suite.models import SMALL_DENSENET, cache_key, load_checkpoint, save_checkpoint

    vendor = load_vendor_data(dataset_cfg or DatasetConfig(name=data.name), data, seed, quick)
    recipe = recipe_for(cfg, seed, quick)
    key = cache_key("small-densenet", SMALL_DENSENET, vendor.fingerprint(), recipe.__dict__,
                    "seeded-init", "vendor-data")
    path = cache_dir() / "models" / f"small-densenet-{key}.pt"
    if not path.exists():
        bundle = train_small_densenet(vendor, recipe, progress, role="vendor")
        save_checkpoint(bundle, path, recipe=recipe.__dict__)
    return load_checkpoint(path), {"kind": "checkpoint", "path": str(path)}


def vendor_description(bundle: ModelBundle) -> dict[str, Any]:
    """What run.json says about the vendor's data behind `bundle`."""
    extra = bundle.extra or {}
    if bundle.source == "xrv-weights" or bundle.name.startswith("xrv:"):
        from suite.data.roles import XRV_TRAINING_SETS

        weights = bundle.name.removeprefix("xrv:")
        return {"source": f"torchxrayvision weights {weights}",
                "datasets": list(XRV_TRAINING_SETS.get(weights, ("unknown public sets",))),
                "n_images": None, "checked": "by dataset name (the weights list no images)"}
    if "train_image_ids" in extra:
        sites = extra.get("train_sites") or []
        return {"source": f"{extra.get('dataset')} ({'vendor data' if extra.get('data_role') == 'vendor' else 'checkpoint training images'})",
                "dataset": extra.get("dataset"), "n_images": len(extra["train_image_ids"]),
                "sites": sites, "checked": "image ids" + (" and pixel hashes" if extra.get("train_image_hashes") else "")}
    return {"source": f"none: {bundle.name} is untrained ({bundle.source})", "n_images": 0}


def check_vendor_disjoint(bundle: ModelBundle, data: ImageSet, splits: tuple[str, ...],
                          dataset_name: str | None = None) -> None:
    """Refuse a run whose model saw any image of the named hospital splits."""
    from suite.data.roles import check_disjoint, check_xrv_weights

    extra = bundle.extra or {}
    if bundle.name.startswith("xrv:"):
        check_xrv_weights(bundle.name.removeprefix("xrv:"), dataset_name or data.name)
    elif "train_image_ids" in extra:
        check_disjoint(extra["train_image_ids"], extra.get("train_image_hashes"), data, splits,
                       source=f"model '{bundle.name}' (trained on {extra.get('dataset')})")


def check_no_leak(bundle: ModelBundle, data: ImageSet, path: Path | str | None = None,
                  split: str | None = None) -> None:
    """A checkpoint must not have been trained on the images it is now tested on: refused in
    one line naming the checkpoint, how many of its recorded training images are among this
    run's test images, and what to do instead."""
    recorded = bundle.extra.get("train_image_ids", [])
    test = data.split("test")
    overlap = set(recorded) & set(test.image_ids.tolist())
    if not overlap:
        return
    which = f"checkpoint {path}" if path else f"checkpoint '{bundle.name}'"
    seen = (f"{which} was trained on {len(overlap)} of this run's {len(test)} test images "
            f"({len(overlap)} of its {len(recorded)} recorded training images, e.g. {sorted(overlap)[0]})")
    if split == "all":
        todo = ("--split all scores every image, so validate it on a dataset it never saw, or drop "
                "--split all to score only the images `suite train` held out (same dataset, seed "
                "and test_fraction)")
    else:
        todo = "use the same dataset, seed and test_fraction as `suite train`, so they stay in the train split"
    raise SuiteError(f"{seen}; {todo}")


def check_pathologies(bundle: ModelBundle, data: ImageSet) -> None:
    missing = [n for n in data.label_names if n not in bundle.pathologies]
    if missing:
        raise SuiteError(
            f"checkpoint '{bundle.name}' does not predict dataset label(s) {missing}; "
            f"it was trained for {[p for p in bundle.pathologies if p]}")


def load_model_ref(ref: dict[str, Any]) -> ModelBundle:
    """What a worker calls: the same weights the parent resolved."""
    import torch

    from suite.models import load_checkpoint, load_xrv_weights, random_densenet121, random_small_densenet

    if ref["kind"] == "checkpoint":
        return load_checkpoint(Path(ref["path"]))
    if ref["kind"] == "xrv":
        return load_xrv_weights(ref["weights"])
    if ref["kind"] == "random":
        if ref.get("architecture") == "small":
            return random_small_densenet(ref["pathologies"], ref["resolution"], ref["seed"])
        torch.manual_seed(ref["seed"])
        return random_densenet121(ref["pathologies"], ref["resolution"])
    raise SuiteError(f"unknown model reference {ref}")
