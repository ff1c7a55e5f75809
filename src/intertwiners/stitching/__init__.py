"""Model stitching (paper §4): stitching layers, the closed-form channel match, ``stitch``, sweeps, Fig. 1.

Main entry points:

* :func:`stitch` — stitch two frozen models at an activation site with a layer of a given kind; returns
  accuracies, the penalty of eq. 4.3, the layer and its matrix.
* :func:`stitch_sweep` — model pairs x sites x kinds, one plain-dict row per stitch.
* :func:`plot_penalties` — the Fig. 1 plot (mean penalty per site with confidence intervals, one line per kind).
"""

from .layers import KINDS, apply_channel_map, make_layer
from .matching import ChannelStats, closed_form_match
from .plot import plot_penalties, plot_slope_sweep
from .stitch import (
                     SETTINGS,
                     StitchResult,
                     StitchSettings,
                     split_model,
                     stitch,
                     stitch_many,
                     stitchable_sites,
                     stitching_penalty,
)
from .sweep import DEFAULT_KINDS, draw_pairs, model_folders, stitch_sweep, summarize

__all__ = ["DEFAULT_KINDS", "KINDS", "SETTINGS", "ChannelStats", "StitchResult", "StitchSettings",
           "apply_channel_map", "closed_form_match", "draw_pairs", "make_layer", "model_folders",
           "plot_penalties", "plot_slope_sweep", "split_model", "stitch", "stitch_many", "stitch_sweep",
           "stitchable_sites", "stitching_penalty", "summarize"]
