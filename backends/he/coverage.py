"""How much of a model ran under protection: multiply-accumulates per layer (torch, plaintext).

`protected_mac_fraction` on an inference row = MACs computed on protected data / MACs of
the model's forward pass, so one encrypted layer and a whole encrypted network no longer
share a column without saying so.
"""

from __future__ import annotations


def layer_macs(net, resolution: int) -> list[tuple[str, int]]:
    """(module name, MACs) of every Conv2d and Linear for one [1, 1, r, r] image."""
    import torch
    from torch import nn

    out: list[tuple[str, int]] = []
    hooks = []
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d):
            def conv_hook(m, inp, res, name=name):
                k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
                out.append((name, int(res.numel()) * k))
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            def lin_hook(m, inp, res, name=name):
                out.append((name, int(res.numel()) * m.in_features))
            hooks.append(mod.register_forward_hook(lin_hook))
    try:
        with torch.no_grad():
            net.classifier(net.features2(torch.zeros(1, 1, resolution, resolution)))
    finally:
        for h in hooks:
            h.remove()
    return out


def head_mac_fraction(net, resolution: int) -> float:
    """Share of the DenseNet's MACs in its classifier (what head mode encrypts)."""
    macs = layer_macs(net, resolution)
    total = sum(m for _, m in macs)
    head = sum(m for n, m in macs if n == "classifier")
    return head / total if total else 0.0
