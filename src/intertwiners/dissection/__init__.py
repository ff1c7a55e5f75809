"""Network dissection in a rotated basis (paper §6, Fig. 3).

``random_rotation`` / ``rotation_power``: Haar-random rotations and their powers along the minimal
geodesic from I; ``BrodenDataset``: the Broden probe-set layout; ``make_synthetic_broden``: a small
dataset in that layout with known concepts; ``dissect``: NetDissect of any site, in any basis.
The Fig. 3 experiment lives in :mod:`intertwiners.dissection.experiment`.
"""

from .broden import BrodenDataset, Concept, load_images
from .dissect import DissectionResult, UnitResult, dissect, dissect_many
from .rotations import random_rotation, rotation_log, rotation_power
from .synthetic import make_synthetic_broden

__all__ = ["BrodenDataset", "Concept", "DissectionResult", "UnitResult", "dissect", "dissect_many",
           "load_images", "make_synthetic_broden", "random_rotation", "rotation_log", "rotation_power"]
