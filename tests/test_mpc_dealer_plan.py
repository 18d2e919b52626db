"""backends.mpc.dealer_plan: a batch's dealer requests from shapes alone.

The real check runs in every two-party test (party 0's DealerClient stops the run when a gate
asks for anything but the next planned request); here the plan's content is checked on a tiny
DenseNet: one plain-weight product per convolution and the classifier, one truncation pair per
product and for the global average, one ReLU per pre-activation and pooling comparison.
"""

from __future__ import annotations

import torch

from backends.mpc.crypten_party import plain_weight_ops
from backends.mpc.dealer_plan import batch_requests
from backends.mpc.plan import build_plan
from backends.mpc.protocol import PlainWeight, relu_triple_requests
from suite.models import build_densenet

ARCH = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)


def _plan_and_weights():
    torch.manual_seed(0)
    plan, params = build_plan(build_densenet(ARCH, 2).eval())
    ops = plain_weight_ops(plan)
    weights = {}
    for i, name in enumerate(ops):
        shape = plan.shapes[name]
        weights[name] = PlainWeight(i, ops[name], shape[::-1] if ops[name] == "matmul" else shape)
    return plan, {**{k: None for k in plan.shapes}, **weights}, ops


def test_one_product_and_one_pair_per_weight_use():
    plan, params, ops = _plan_and_weights()
    requests = batch_requests(plan, params, (2, 1, 32, 32), bits=20)
    products = [r for r in requests if r[0] == "plain_product"]
    pairs = [r for r in requests if r[0] == "trunc_pair"]
    assert len(products) == len(ops)                       # each weight used once per evaluation
    assert len(pairs) == len(products) + 1                 # + the global average
    assert all(r[1][1] == 20 for r in pairs)
    stem = products[0]
    assert stem[1][1] == torch.Size([2, 1, 32, 32]) and stem[2] == {"stride": 2, "padding": 3}
    assert products[-1][1][3] == "matmul" and products[-1][1][1] == torch.Size([2, plan.shapes[plan.fc_w][1]])


def test_relu_requests_follow_the_gates_own_list():
    plan, params, _ = _plan_and_weights()
    requests = batch_requests(plan, params, (1, 1, 32, 32), bits=20)
    masks = [r for r in requests if r[0] == "relu_mask"]
    n = masks[0][1][0][0]
    start = requests.index(masks[0]) - len(relu_triple_requests(n)) + 1
    assert requests[start:start + len(relu_triple_requests(n))] == relu_triple_requests(n)
