"""Rules from a user's own code: a custom operator becomes a free, verified space; a deliberately wrong rule
is caught by verification (report not ok, CLI exit 1), and by the safety check as the last line of defence."""

import sys
import textwrap

import pytest
import torch
from torch import nn
from user_rules import SoftsignMLP, softsign_rule

from intertwiners import cli
from intertwiners.symmetries import (
    Layout,
    apply_symmetry,
    register_rule,
    symmetry_spec,
    unregister_rule,
    verify_symmetry,
)
from intertwiners.symmetries.compare import compare
from intertwiners.symmetries.safety import SAFETY_REASON

aten = torch.ops.aten
X = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_a_rule_from_outside_the_package_frees_the_space():
    torch.manual_seed(0)
    model = SoftsignMLP().double()
    op = torch.ops.user_rules.softsign
    unregister_rule(op)
    try:
        spec = symmetry_spec(model, X)
        assert not spec.spaces and "softsign" in spec.pinned["fc1"] and "not supported" in spec.pinned["fc1"]
    finally:
        register_rule(op, softsign_rule)
    spec = symmetry_spec(model, X, check=False)
    (space,) = spec.spaces.values()
    assert space.kind == "signed_permutation" and space.sites == [":softsign"] and not spec.pinned
    report = verify_symmetry(model, X, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    # and the group is not larger than it should be: a scaling changes the output
    bad = apply_symmetry(model, {space.name: torch.diag(torch.full((6,), 2.0, dtype=torch.float64))}, spec,
                         check=False)
    assert compare(model, bad, X, ("eval",))["eval"][1] > 1e-3


@pytest.fixture
def wrong_rules():
    """Deliberately wrong rules: sigmoid claimed to have ReLU's group; roll treated as channel-wise."""
    def sigmoid_as_relu(ctx, node):
        x = ctx.value(node.args[0])
        return ctx.activation(node, x, "relu") if isinstance(x, Layout) else None

    def roll_channelwise(ctx, node):
        return ctx.value(node.args[0])

    register_rule(aten.sigmoid, sigmoid_as_relu)
    register_rule(aten.roll, roll_channelwise)
    yield
    unregister_rule(aten.sigmoid)
    unregister_rule(aten.roll)


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(torch.roll(self.a(x), 1, -1)))


@pytest.mark.safety_pins
@pytest.mark.parametrize("build", [lambda: nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)), Rolled])
def test_a_wrong_rule_fails_verification(wrong_rules, build):
    torch.manual_seed(0)
    model = build().double()
    report = verify_symmetry(model, X, trials=2)
    assert not report.ok and report.failures() and "FAILED" in str(report)
    # the safety check, the last line of defence, pins it (and says so)
    spec = symmetry_spec(model, X)
    assert any(SAFETY_REASON in r for r in spec.pinned.values())


@pytest.mark.safety_pins
def test_the_safety_check_pins_exactly_the_wrong_spaces_among_many(wrong_rules):
    """All spaces at once fail; halving them finds the one wrong space (sigmoid claimed G_ReLU) and pins only
    it, with its error, however many correct spaces surround it."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.Sigmoid(),
              nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    derived = symmetry_spec(model, X, check=False)
    assert len(derived.spaces) == 5 and not derived.pinned
    spec = symmetry_spec(model, X)
    (wrong,) = [n for n in derived.spaces if n.startswith("5")]   # the sigmoid's space
    assert list(spec.pinned) == [wrong] and SAFETY_REASON in spec.pinned[wrong]
    assert "relative error" in spec.pinned[wrong] and set(spec.spaces) == set(derived.spaces) - {wrong}


def test_the_no_safety_pins_guard_sees_a_wrong_rule(wrong_rules, no_safety_pins):
    """The suite-wide guard (tests/conftest.py) records a safety pin: with a wrong rule it has one to report
    (emptied here so this test passes; every other unmarked test fails on one)."""
    model = Rolled().double()
    spec = symmetry_spec(model, X)
    found = list(no_safety_pins)
    no_safety_pins.clear()
    assert found and all(SAFETY_REASON in why for _, why in found)
    assert {name for name, _ in found} <= set(spec.pinned)


def test_spaces_pinned_on_purpose_keep_their_reason_and_are_not_failures():
    """A shift of the channel axis pins them with a reason; verify passes and lists the pin, not a failure."""
    class ChannelRoll(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.roll(torch.relu(self.a(x)), 1, -1))

    torch.manual_seed(0)
    model = ChannelRoll().double()
    spec = symmetry_spec(model, X, check=False)
    assert spec.pinned and all(isinstance(r, str) and r and SAFETY_REASON not in r for r in spec.pinned.values())
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and not report.failures() and report.pinned == spec.pinned
    assert all(f"pinned: {r}" in str(report) for r in spec.pinned.values())


def test_without_the_wrong_rule_sigmoid_is_a_permutation_space():
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()
    spec = symmetry_spec(model, X, check=False)
    assert [s.kind for s in spec.spaces.values()] == ["permutation"] and verify_symmetry(model, X, spec=spec).ok


def test_the_cli_exits_1_on_a_wrong_rule(tmp_path, monkeypatch, capsys, wrong_rules):
    (tmp_path / "wrong_rule_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)), torch.randn(4, 4)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("wrong_rule_models", None)
    rc = cli.main(["verify", "wrong_rule_models:build", "--trials", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED" in out and "OK" not in out
    sys.modules.pop("wrong_rule_models", None)
