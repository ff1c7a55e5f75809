"""Weight-space symmetries of real models, found by tracing (paper §3.2, Proposition 3.4, Remark 3.6).

>>> spec = symmetry_spec(model, x)                  # spaces, their groups, what is pinned and why
>>> spec.slots("layer1.0.relu1")                    # every tensor axis a space acts on, and how
>>> elements = random_symmetry(spec)                # {space: (n, n) tensor}
>>> new = apply_symmetry(model, elements, spec)     # same function, different weights
>>> print(verify_symmetry(model, x))                # per-space output errors of the spec as derived

The engine, pass by pass: :mod:`.capture` (aten graph) -> :mod:`.analysis` (one rule per node, rules in
:mod:`.ops`, registered in :mod:`.registry`, reading and writing through :class:`.context.Context`) ->
:mod:`.resolve` (spaces, groups) -> :mod:`.slots` / :mod:`.spec` -> :mod:`.safety`. See docs/symmetries.md.
"""

from .apply import apply_symmetry, dense_symmetry, random_symmetry
from .chains import Power
from .constraints import Activation, ConstantAdd, Constraint, Monomial, PositiveScales, Signed, Unit
from .context import Context
from .derive import symmetry_spec
from .layout import Channels, Layout
from .records import DerivedParam, ParamRef
from .registry import register_rule, unregister_rule
from .slots import Carried, Columns, Features, Gain, HeadBlocks, Permuted, Rows, Slot
from .spec import ParamAction, Space, SymmetrySpec
from .structured import AttentionGroup
from .verify import VerifyReport, compare, tolerance, verify_symmetry

__all__ = ["Activation", "AttentionGroup", "Carried", "Channels", "Columns", "ConstantAdd", "Constraint", "Context",
           "DerivedParam", "Features", "Gain", "HeadBlocks", "Layout", "Monomial", "ParamAction",
           "ParamRef", "Permuted", "PositiveScales", "Power", "Rows", "Signed", "Slot", "Space", "SymmetrySpec",
           "Unit", "VerifyReport", "apply_symmetry", "compare", "dense_symmetry", "random_symmetry",
           "register_rule", "symmetry_spec", "tolerance", "unregister_rule", "verify_symmetry"]
