"""intertwiners: the symmetries of deep learning models and their internal representations.

An implementation of Godfrey, Brown, Emerson & Kvinge, "On the Symmetries of Deep Learning Models and
their Internal Representations" (NeurIPS 2022): intertwiner groups (§3.1), weight-space symmetries of
real models (§3.2), stitching (§4), G_ReLU similarity measures (§5) and dissection in rotated bases (§6).
"""

from ._worker import die_with_driver as _die_with_driver

_die_with_driver()   # a reproduce worker never outlives its driver (see _worker.py); a no-op anywhere else

from . import data, models  # noqa: E402
from .features import activation_sites, extract_features  # noqa: E402

__version__ = "0.1.0"

__all__ = ["activation_sites", "data", "extract_features", "models"]


def __getattr__(name):
    # Submodules and later layers load lazily so `import intertwiners` stays fast.
    import importlib

    lazy = {
        "intertwiner_group": ("groups", "intertwiner_group"),
        "IntertwinerGroup": ("groups", "IntertwinerGroup"),
        "symmetry_spec": ("symmetries", "symmetry_spec"),
        "random_symmetry": ("symmetries", "random_symmetry"),
        "apply_symmetry": ("symmetries", "apply_symmetry"),
        "verify_symmetry": ("symmetries", "verify_symmetry"),
        "align": ("alignment", "align"),
        "interpolate": ("alignment", "interpolate"),
        "merge": ("alignment", "merge"),
        "canonicalize": ("alignment", "canonicalize"),
    }
    if name in lazy:
        mod, attr = lazy[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in ("similarity", "stitching", "dissection", "experiments", "training", "groups", "symmetries",
                "alignment"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'intertwiners' has no attribute {name!r}")
