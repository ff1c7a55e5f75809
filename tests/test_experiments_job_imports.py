"""experiments.jobs.need_missing: a module that is not installed leaves its experiment out (named); one that
is installed but cannot be imported fails the run with the job's name and a non-zero exit."""

from __future__ import annotations

import sys

import pytest

from intertwiners import cli
from intertwiners.experiments import jobs


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    (tmp_path / "itw_broken_job_module.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "itw_missing_dep_module.py").write_text("import itw_no_such_dependency\n")
    (tmp_path / "itw_fine_job_module.py").write_text("def run():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("itw_broken_job_module", "itw_missing_dep_module", "itw_fine_job_module"):
        sys.modules.pop(name, None)


def test_not_installed_is_a_reason_broken_is_an_error(broken_module):
    assert jobs.need_missing("itw_fine_job_module:run", "demo") is None
    assert jobs.need_missing("itw_fine_job_module", "demo") is None
    assert "not available" in jobs.need_missing("itw_fine_job_module:absent", "demo")
    assert "not available" in jobs.need_missing("itw_not_installed_anywhere:run", "demo")
    assert "not available" in jobs.need_missing("itw_not_installed_anywhere.sub", "demo")
    for need in ("itw_broken_job_module", "itw_broken_job_module:run", "itw_missing_dep_module:run"):
        with pytest.raises(ValueError, match="experiment job 'demo'.*cannot be imported"):
            jobs.need_missing(need, "demo")


def test_broken_experiment_fails_the_run(broken_module, monkeypatch, capsys):
    """A paper experiment whose job module fails to import: ``reproduce`` exits non-zero and names the job on
    one line (it is not left out of the plan with exit 0); a module that is not installed is still a reason."""
    from dataclasses import replace

    from intertwiners.experiments.figures import EXPERIMENTS

    _, module = EXPERIMENTS[0]          # the first experiment: the plan fails before building any job
    kind = module.KINDS[0]
    monkeypatch.setitem(jobs.JOB_TYPES, kind, replace(jobs.JOB_TYPES[kind], needs=("itw_broken_job_module:run",)))
    code = cli.main(["reproduce", "--scale", "smoke", "--list"])
    err = capsys.readouterr().err
    assert code != 0 and kind in err and "boom at import" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(jobs.JOB_TYPES, kind, replace(jobs.JOB_TYPES[kind], needs=("itw_not_installed_anywhere",)))
    assert jobs.JOB_TYPES[kind].missing() == "module itw_not_installed_anywhere is not available"
