"""Weight-space symmetries of real models, found by tracing (paper §3.2, Proposition 3.4, Remark 3.6).

>>> spec = symmetry_spec(model, x)                  # spaces, their groups, what is pinned and why
>>> elements = random_symmetry(spec)                # {space: (n, n) tensor}
>>> new = apply_symmetry(model, elements, spec)     # same function, different weights
>>> print(verify_symmetry(model, x))                # per-space output errors

See docs/symmetries.md.
"""

from .apply import apply_symmetry, dense_symmetry, random_symmetry
from .resolve import ParamAction, Segment
from .spec import Space, SymmetrySpec, symmetry_spec
from .structured import AttentionGroup
from .verify import VerifyReport, compare, verify_symmetry

__all__ = ["AttentionGroup", "ParamAction", "Segment",
           "Space", "SymmetrySpec", "VerifyReport", "apply_symmetry", "compare", "dense_symmetry",
           "random_symmetry", "symmetry_spec", "verify_symmetry"]
