"""Every dealer request one batch will make, from the batch's shape alone.

Why: the dealer's triples and truncation pairs do not depend on any input, only on shapes.
When party 0 announces a whole batch's requests before the batch starts, the dealer computes
them while the parties work (and queues its answers, `protocol.serve_dealer`) instead of
each gate waiting for its own. `RequestPlanner` has the interface of
`crypten_party.CrypTenOps` and runs the same `run_plan`, on shapes: it must ask for exactly
what the gates ask for, in the same order; `protocol.DealerClient` checks every request
against the plan and stops the run with a clear error if they ever differ.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.mpc.protocol import PlainWeight, result_size, relu_triple_requests


class Shape:
    """A stand-in for a shared tensor that has only a shape."""

    def __init__(self, shape) -> None:
        self.shape = torch.Size(shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def nelement(self) -> int:
        return int(self.shape.numel())

    def __mul__(self, other: Any) -> "Shape":     # the logits' public output scale
        return self


class RequestPlanner:
    """`CrypTenOps` on shapes (plain weights, exact truncation by pairs, packed ReLU)."""

    def __init__(self, bits: int, narrow: bool = False) -> None:
        self.bits = bits
        self.narrow = narrow          # ReLUs by the narrow comparison (`CrypTenOps.narrow`)
        self.requests: list[tuple] = []

    def _product(self, op: str, x: Shape, w: Any, **kwargs) -> Shape:
        if not isinstance(w, PlainWeight):
            raise ValueError("the request planner covers plain-weight products only")
        args = (w.index, x.shape, w.size, op)
        self.requests.append(("plain_product", args, kwargs))
        out = Shape(result_size("additive", (x.shape, w.size, op), kwargs))
        self._truncate(out)
        return out

    def _truncate(self, x: Shape) -> None:
        self.requests.append(("trunc_pair", (torch.Size([x.nelement()]), self.bits)))

    def conv(self, x, w, b, stride, padding):
        return self._product("conv2d", x, w, stride=stride, padding=padding)

    def linear(self, x, w, b):
        return self._product("matmul", x, w)

    def mul(self, x, s):
        return self._product("mul", x, s)

    def relu(self, x):
        self.requests.extend(relu_triple_requests(x.nelement(), narrow=self.narrow))
        return x

    def maximum_many(self, a_list, b_list):          # always full width
        self.requests.extend(relu_triple_requests(sum(a.nelement() for a in a_list)))
        return list(b_list)

    def add(self, x, t):
        return x

    def cat(self, xs, dim):
        shape = list(xs[0].shape)
        shape[dim] = sum(x.shape[dim] for x in xs)
        return Shape(shape)

    def pad(self, x, dim, p, value):
        shape = list(x.shape)
        shape[dim] += 2 * p
        return Shape(shape)

    def strided(self, x, dim, start, step, length):
        shape = list(x.shape)
        shape[dim] = length
        return Shape(shape)

    def sum_pool2(self, x):
        n, c, h, w = x.shape
        return Shape([n, c, h // 2, w // 2])

    def global_avg(self, x):
        n, c, h, w = x.shape
        out = Shape([n, c])
        if h * w != 1:
            self._truncate(out)
        return out


def batch_requests(plan: Any, params: dict[str, Any], input_shape, bits: int, narrow: bool = False
                   ) -> list[tuple]:
    """The dealer requests, in order, of one secure evaluation of `plan` on `input_shape`."""
    from backends.mpc.graph import run_plan

    planner = RequestPlanner(bits, narrow)
    run_plan(plan, params, Shape(input_shape), planner)
    return planner.requests
