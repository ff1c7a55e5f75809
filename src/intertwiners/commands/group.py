"""intertwiners group: the intertwiner group of an activation, with a numerical check."""

from __future__ import annotations

import json

from . import _args

NAME = "group"
HELP = "Print the intertwiner group G_sigma of an activation (kind, phi, dimension) and check it numerically."


def add_arguments(p):
    p.add_argument("name", help="activation name: identity, relu, leaky_relu:0.2, sigmoid, tanh, gelu, silu, elu, "
                                "softplus, gaussian, power:3, abs")
    p.add_argument("--n", type=_args.positive_int, default=4, help="example size n of the hidden space")
    p.add_argument("--samples", type=_args.positive_int, default=100, help="random (A, x) pairs in the check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--derive", action="store_true",
                   help="derive the group from sigma's numerically checked properties instead of Table 1")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def check_intertwining(group, n: int, samples: int, seed: int) -> dict:
    """Max |sigma(A x) - phi(A) sigma(x)| over random A in G and x ~ N(0, 4 I) (float64), and the check
    of phi against Lemma 3.1's sigma(A) sigma(I)^-1.

    The maxima propagate NaN (a NaN or an overflow anywhere makes the error NaN or inf, and the check
    fails); a singular sigma(I) or a phi that raises also fails the check, with the reason in ``"error"``.
    """
    import math

    import torch

    from .._util import max_nan

    g = torch.Generator().manual_seed(seed)
    sigma = group.sigma
    worst, worst_lemma = 0.0, 0.0
    error = None
    with torch.no_grad():
        eye_image = sigma(torch.eye(n, dtype=torch.float64))
        for _ in range(samples):
            A = group.sample(n, generator=g)
            x = 2.0 * torch.randn(n, 16, generator=g, dtype=torch.float64)
            phi = group.phi(A)
            lhs, rhs = sigma(A @ x), phi @ sigma(x)
            worst = max_nan(worst, float(((lhs - rhs).abs() / (1 + rhs.abs())).max()))
            try:
                lemma = torch.linalg.solve(eye_image.T, sigma(A).T).T
                worst_lemma = max_nan(worst_lemma, float((lemma - phi).abs().max()))
            except RuntimeError as err:   # torch.linalg.LinAlgError: sigma(I) singular or not finite
                worst_lemma, error = math.inf, f"sigma(I) cannot be inverted: {str(err).splitlines()[0]}"
            if math.isnan(worst) or math.isnan(worst_lemma):
                break
    return {"max_rel_error": worst, "max_lemma_error": worst_lemma, "samples": samples, "n": n, "error": error}


def passes(check: dict, tol: float = 1e-8) -> bool:
    """Both errors below ``tol`` (False for NaN: a comparison with NaN is never true)."""
    return bool(check["max_rel_error"] < tol and check["max_lemma_error"] < tol)


def run(args) -> int:
    from ..activations import make_activation
    from ..groups import derive_group, intertwiner_group

    if args.n < 1 or args.samples < 1:
        raise ValueError("--n and --samples must be positive")
    G = derive_group(make_activation(args.name), args.name) if args.derive else intertwiner_group(args.name)
    G.check_size(args.n)
    check = check_intertwining(G, args.n, args.samples, args.seed)
    passed = passes(check)
    info = {"name": G.name, "kind": G.kind, "description": G.description, "phi": G.phi_rule,
            "n": args.n, "dimension": G.dimension(args.n), "check": check, "passed": passed}
    if args.json:
        print(json.dumps(info))   # NaN / inf errors are written as NaN / Infinity (and "passed": false)
    else:
        print(f"activation   {G.name}")
        print(f"kind         {G.kind}")
        print(f"group        {G.description}")
        print(f"phi(A)       {G.phi_rule}")
        print(f"dimension    {info['dimension']} (n = {args.n})")
        print(f"check        max |sigma(Ax) - phi(A) sigma(x)| / (1 + |phi(A) sigma(x)|) = "
              f"{check['max_rel_error']:.2e} over {args.samples} random A in G (float64)")
        print(f"lemma 3.1    max |phi(A) - sigma(A) sigma(I)^-1| = {check['max_lemma_error']:.2e}")
        if check.get("error"):
            print(f"note         {check['error']}")
        print(f"result       {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1
