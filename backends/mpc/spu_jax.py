"""The secure DenseNet plan as a JAX function, for SecretFlow SPU (`mpc:engine=spu`).

`backends.mpc.graph.run_plan` executes a `Plan` through an ops object; `JaxOps` is that
object for `jax.numpy`, so tracing `run_plan` yields the JAX function SPU compiles. The plan
and its parameters come from the suite's own translator (`backends.mpc.plan.build_plan`:
BatchNorm folded, the same poolings), never from a hand-copied network. This module imports
only numpy, jax and `backends.mpc.graph`: it runs in `.venv-spu/`, which has no torch.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from backends.mpc.graph import Plan, run_plan


class JaxOps:
    """The ops `run_plan` needs, on jax arrays (NCHW, OIHW weights like torch)."""

    def __init__(self) -> None:
        import jax.numpy as jnp
        from jax import lax

        self.jnp, self.lax = jnp, lax

    def conv(self, x, w, b, stride, padding):
        y = self.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                          dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y if b is None else y + b.reshape(1, -1, 1, 1)

    def linear(self, x, w, b):
        return x @ w.T + b

    def relu(self, x):
        return self.jnp.maximum(x, 0)

    def maximum_many(self, a_list, b_list):
        """max(a, b) for every pair in one batched comparison (one set of rounds)."""
        if len(a_list) == 1:
            return [self.jnp.maximum(a_list[0], b_list[0])]
        jnp = self.jnp
        sizes = [a.size for a in a_list]
        m = jnp.maximum(jnp.concatenate([a.reshape(-1) for a in a_list]),
                        jnp.concatenate([b.reshape(-1) for b in b_list]))
        out, start = [], 0
        for a, n in zip(a_list, sizes):
            out.append(m[start:start + n].reshape(a.shape))
            start += n
        return out

    def mul(self, x, s):
        return x * s

    def add(self, x, t):
        return x + t

    def cat(self, xs, dim):
        return self.jnp.concatenate(xs, axis=dim)

    def pad(self, x, dim, p, value):
        widths = [(0, 0)] * x.ndim
        widths[dim] = (p, p)
        return self.jnp.pad(x, widths, constant_values=value)

    def strided(self, x, dim, start, step, length):
        return self.lax.slice_in_dim(x, start, start + (length - 1) * step + 1, step, axis=dim)

    def sum_pool2(self, x):
        h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
        x = x[:, :, :h, :w]
        return x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]

    def global_avg(self, x):
        hw = x.shape[2] * x.shape[3]
        s = x.sum(axis=(2, 3))
        return s * (1.0 / hw) if hw > 1 else s     # a public constant: one truncation


def param_names(plan: Plan) -> list[str]:
    """The order in which the parameters are the JAX function's arguments after the images."""
    return sorted(plan.shapes)


def plan_function(plan: Plan) -> Callable[..., Any]:
    """f(x, *params in `param_names(plan)` order) -> logits, for x already multiplied by
    `plan.input_scale`."""
    names = param_names(plan)

    def secure_densenet(x, *weights):
        return run_plan(plan, dict(zip(names, weights)), x, JaxOps())

    return secure_densenet


def plaintext_logits(plan: Plan, params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """The plan in plaintext JAX (float32), scaled as the secure evaluation is: what the
    tests compare with torch to check the translation."""
    import jax

    f = jax.jit(plan_function(plan))
    x = np.asarray(images, dtype=np.float32) * np.float32(plan.input_scale)
    out = f(x, *[np.asarray(params[n], dtype=np.float32) for n in param_names(plan)])
    return np.asarray(out, dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    """`python -m backends.mpc.spu_jax IN.pkl OUT.pkl` (in .venv-spu): the plan in plaintext JAX.

    IN holds {"plan": plan_to_dict(...), "params": {name: packed}, "images": packed} (arrays
    packed as by `backends.mpc.spu_party.pack`); OUT gets {"logits": packed}. The tests use it
    to compare the JAX translation with torch across the two environments.
    """
    import pickle
    import sys

    from backends.mpc.graph import plan_from_dict
    from backends.mpc.codec import pack, unpack

    src, dst = (sys.argv[1:] if argv is None else argv)[:2]
    with open(src, "rb") as f:
        job = pickle.load(f)
    plan = plan_from_dict(job["plan"])
    params = {k: unpack(v) for k, v in job["params"].items()}
    logits = plaintext_logits(plan, params, unpack(job["images"]))
    with open(dst, "wb") as f:
        pickle.dump({"logits": pack(logits)}, f, protocol=4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
