"""The paper's experiments, one module per figure or table.

Each module is the one home of its experiment: its plan fragment (``jobs(scale) -> list[Job]``), its job
functions (registered with :func:`intertwiners.experiments.jobs.register`), its report section
(``section(view, figdir) -> Section``, with the claims and their tests) and its figure, drawn by the same
library function as the matching CLI command (``stitch``, ``rotation-penalty``, ``similarity``, ``dissect``).

* :mod:`.zoo` — the trained models and their accuracy table;
* :mod:`.fig1_stitching` — Fig. 1, stitching penalties (also the job type of D.3);
* :mod:`.fig4_rotation` — Fig. 4, rotation penalties;
* :mod:`.d3_slopes` — appendix D.3, LeakyReLU slopes;
* :mod:`.table2_procrustes` — Table 2, Procrustes per layer, with permutation tests;
* :mod:`.cka` — Figs. 5 and 2, CKA heatmaps, with permutation tests;
* :mod:`.fig3_dissection` — Fig. 3, dissection under rotation;
* :mod:`.alignment_barriers` — an extension beyond the paper: interpolation barriers of zoo pairs before
  and after alignment through the intertwiner group.

:data:`EXPERIMENTS` lists them in plan order (name, module); the report's order is :data:`SECTIONS`.
"""

from __future__ import annotations

from . import alignment_barriers, cka, d3_slopes, fig1_stitching, fig3_dissection, fig4_rotation, table2_procrustes, zoo
from .common import Section

# Plan order: the Fig. 3 models train longest, so they start first and overlap with the rest (job ids do
# not depend on the order).
EXPERIMENTS = (("fig3_dissection", fig3_dissection), ("zoo", zoo), ("fig1_stitching", fig1_stitching),
               ("table2_procrustes", table2_procrustes), ("cka_fig5_fig2", cka),
               ("fig4_rotation_penalty", fig4_rotation), ("d3_leaky_relu_sweep", d3_slopes),
               ("alignment_barriers", alignment_barriers))


def _section(module, *args):
    return lambda view, figdir: module.section(view, figdir, *args)


SECTIONS = (zoo.section, fig1_stitching.section, fig4_rotation.section, d3_slopes.section,
            table2_procrustes.section, _section(cka, "fig5"), _section(cka, "fig2"), fig3_dissection.section,
            alignment_barriers.section)

__all__ = ["EXPERIMENTS", "SECTIONS", "Section"]
