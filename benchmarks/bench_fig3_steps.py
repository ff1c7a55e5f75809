"""Fig. 3's claims against the training steps of its models: how many steps the claims need (issue 19).

For each ``--steps`` value, the Fig. 3 jobs of ``--scale`` alone (every other setting as the preset), run into
``OUT/steps<N>`` with the local backend; then, per dissected curve: the model's probe accuracy, the fraction
of interpretable units at alpha 0, the claim's answer with its numbers, and the compute of the model's training
and of the dissection. A result already in ``OUT`` is reused (the runs are resumable)::

    PYTHONPATH=src python benchmarks/bench_fig3_steps.py --steps 300 600 1500 --out runs/fig3_steps
    PYTHONPATH=src python benchmarks/bench_fig3_steps.py --steps 500 --batch-size 16 --out runs/fig3_steps

The answers printed are the report's own (``experiments.figures.fig3_dissection.section``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from intertwiners.experiments import ResultsStore, Scale, build_plan, run_jobs
from intertwiners.experiments.backends import make_backend
from intertwiners.experiments.figures import fig3_dissection
from intertwiners.experiments.report import PlanView
from intertwiners.experiments.runner import closure

KINDS = ("dissection_model", "dissection")


def run(scale: str, steps: int, out: Path, workers: int, batch_size: int | None = None,
        widths: tuple | None = None, image_size: int | None = None) -> dict:
    """Run the Fig. 3 jobs of ``scale`` with ``steps`` training steps (of ``batch_size`` images; default: the
    scale's) into ``out``; the section and timings."""
    changes = {"steps": steps, **({} if batch_size is None else {"batch_size": batch_size}),
               **({} if widths is None else {"widths": tuple(widths)}),
               **({} if image_size is None else {"image_size": image_size})}
    plan = build_plan(Scale.preset(f"{scale}-steps{steps}", base=scale, fig3_dissection=changes))
    jobs = [j for j in closure(plan.jobs) if j.kind in KINDS]
    t0 = time.perf_counter()
    run_jobs(jobs, out, make_backend("local", workers=workers), progress=False,
             meta={"plan_ids": [j.id for j in jobs]})
    wall = time.perf_counter() - t0
    with ResultsStore(out, readonly=True) as store:
        view = PlanView(store)
        section = fig3_dissection.section(view, None)
        compute = {kind: sum(r.wall_s or 0 for r in view.rows(kind=kind, status="done")) for kind in KINDS}
        models = [{**r.result, "wall_s": r.wall_s or 0} for r in view.rows(kind="dissection_model", status="done")]
    return {"section": section, "wall_s": wall, "compute": compute, "models": models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 600, 1500])
    parser.add_argument("--scale", default="small")
    parser.add_argument("--out", type=Path, default=Path("runs/fig3_steps"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the scale's)")
    parser.add_argument("--widths", type=int, nargs=3, default=None, help="stage widths (default: the scale's)")
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the scale's)")
    args = parser.parse_args()
    for steps in args.steps:
        tag = (f"steps{steps}" + ("" if args.batch_size is None else f"-batch{args.batch_size}")
               + ("" if args.widths is None else "-widths" + "-".join(map(str, args.widths)))
               + ("" if args.image_size is None else f"-size{args.image_size}"))
        found = run(args.scale, steps, args.out / tag, args.workers, args.batch_size, args.widths, args.image_size)
        c = found["compute"]
        for model in found["models"]:
            print(f"{model['arch']}: probe accuracy {model['probe_accuracy']:.1f}%, training {model['wall_s']:.0f} s")
        print(f"\n## {tag}: wall {found['wall_s']:.0f} s; compute: models {c['dissection_model']:.0f} s, "
              f"dissections {c['dissection']:.0f} s")
        for claim in found["section"].claims:
            print(claim.line())


if __name__ == "__main__":
    main()
