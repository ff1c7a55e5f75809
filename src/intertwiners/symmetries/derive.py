"""``symmetry_spec``: the passes in order, capture -> analysis -> resolution and slots -> (safety check).

:func:`~.capture.capture` traces the model to its aten graph (``torch.export`` as fallback);
:func:`~.analysis.analyse` runs one rule per node (:mod:`~.ops`); :func:`~.spec.build_spec` resolves spaces
and groups (:mod:`~.resolve`) and lists their slots (:mod:`~.slots`); with ``check=True``,
:func:`~.safety.safety_check` pins any derived space that
changes the outputs (a rule bug: the tests require that none is pinned on the models they build).
"""

from __future__ import annotations

from torch import nn

from .analysis import analyse
from .capture import capture
from .inputs import check_model, explain_failure, prepare_inputs
from .module_state import clear_caches, module_state_restored
from .safety import safety_check
from .spec import SymmetrySpec, build_spec


def symmetry_spec(model: nn.Module, example_input, *, check: bool = True, leaf_types: tuple = ()) -> SymmetrySpec:
    """The weight-space symmetries of ``model`` (paper §3.2), found from its captured graph.

    ``example_input``: one input batch (a tensor, a tuple of positional inputs such as token ids, or a dict
    of keyword inputs); the model runs on it in eval mode and is not modified (attributes its forward sets
    or caches on its modules are put back as they were). ``check`` (default True):
    apply a random element of every space and compare outputs on ``example_input`` (eval and train mode,
    float64 copy); a space that fails is pinned with the reason (the last line of defence; ``check=False``
    gives the spec as derived, which :func:`~intertwiners.symmetries.verify_symmetry` checks).
    ``leaf_types`` is accepted for compatibility (capture needs no leaves). Returns a
    :class:`~intertwiners.symmetries.spec.SymmetrySpec`; ValueError naming the problem for a non-module,
    non-finite weights or inputs, a model that fails on its example input or cannot be captured.
    """
    del leaf_types
    check_model(model, "symmetry_spec")
    args = prepare_inputs(model, example_input)
    with module_state_restored(model):  # a forward that caches tensors on its modules leaves no trace of ours
        clear_caches(model)             # and the trace reads the parameters, not a cache of them
        try:
            cap = capture(model, args)
        except ValueError as err:
            _refuse_if_failing(model, args, err)
            raise
        spec = build_spec(analyse(cap, model), type(model).__name__, cap.buffers)
        if check and spec.spaces:
            try:   # a parameter the eval-mode graph never reads may be read in train mode: checked there too
                spec = safety_check(model, args, spec, rtol=1e-5 if spec.lower_precision_inside else 1e-8,
                                    unread=cap.unread)
            except Exception as err:
                # the trace on fake tensors can follow what the model cannot run (an integer input, float layer)
                _refuse_if_failing(model, args, err)
                raise
    return spec


def _refuse_if_failing(model: nn.Module, args, cause: BaseException | None = None) -> None:
    """ValueError saying why ``model`` fails on ``args`` (:func:`explain_failure`), if it does."""
    why = explain_failure(model, args)
    if why is not None:
        raise ValueError(f"symmetry_spec: {why}") from cause
