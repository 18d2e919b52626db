"""Options of the `he` entry, shared by its engines (TenSEAL head/CNN and the whole-network
bootstrapping engine), in a module of their own so no engine imports another."""

from __future__ import annotations

from dataclasses import dataclass

from suite.backend import BackendOptions


@dataclass
class HEOptions(BackendOptions):
    mode: str = "head"                 # head | cnn | cnn-plaintext (the cnn's control)
    engine: str = "tenseal"            # tenseal | desilo (whole DenseNet, bootstrapping) | desilo-plaintext
    batch_size: int = 0                # 0: mode default (head: one full set of slots, cnn: 16)
    max_images: int = 0                # 0: mode default (head: all, cnn: 140)
    poly_modulus_degree: int = 0       # 0: mode default (head 4096, cnn 8192)
    coeff_mod_bit_sizes: tuple = ()    # e.g. 52/36/21; (): mode default
    scale_bits: int = 0                # 0: mode default (head 36, cnn 33)
    allow_insecure: bool = False       # accept parameters below 128-bit security
    cnn_channels: int = 8
    cnn_pool: int = 1                  # average pooling window after the square (1, 2, 4, 8)
    cnn_epochs: int = 20
    fhe_relu_stages: str = "g3-g3-g3-f3-f3"  # engine=desilo: sign composition, left to right
    fhe_resolution: int = 0            # engine=desilo: 0 = the model's; a smaller twin (>= 32) is labelled
    fhe_keys: str = "small+roll"        # engine=desilo: small+roll|full-medium|full-large (bootstrap keys)
