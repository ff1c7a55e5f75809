"""A user's own operation and its rule, written outside the package (the worked example of docs/symmetries.md).

``softsign(x) = x / (1 + |x|)`` is defined as a custom operator with ``torch.library``; ``torch.export`` keeps
it as one node that no built-in rule knows, so without a rule its channels are pinned. The rule says it is an
elementwise activation: the engine derives its intertwiner group (odd, not homogeneous: signed
permutations) and records its activation site.
"""

import torch
from torch import nn

from intertwiners.symmetries import Context, Layout, register_rule


@torch.library.custom_op("user_rules::softsign", mutates_args=())
def softsign(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + x.abs())


@softsign.register_fake
def _(x):
    return torch.empty_like(x)


@register_rule(torch.ops.user_rules.softsign)
def softsign_rule(ctx: Context, node: torch.fx.Node):
    x = ctx.value(node.args[0])        # a Layout when the input is a hidden value
    if not isinstance(x, Layout):
        return None                    # an untransformed input gives an untransformed output
    return ctx.activation(node, x, lambda t: t / (1 + t.abs()))


class SoftsignMLP(nn.Module):
    def __init__(self, d_in=4, hidden=6, d_out=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(softsign(self.fc1(x)))
