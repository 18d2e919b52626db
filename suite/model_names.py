"""The built-in `--model` names and what each is (light: `suite list` shows them without torch)."""

BUILTIN_MODELS = {
    "small-densenet": "small xrv DenseNet (growth 12, blocks 2-2-2-2) trained on the fly on the training split",
    "small-densenet-untrained": "the small xrv DenseNet with seeded random weights (fidelity checks; AUROC ~0.5)",
    "densenet121-random": "xrv DenseNet-121, untrained weights (for timing; AUROC ~0.5)",
}
