"""``python -m jaxmt demo``: its correctness check compares with each tenant's own model (so a
store that served the wrong weights fails it), and bad options are one error line."""

from __future__ import annotations

import pytest

import jaxmt
from jaxmt import cli

TINY = ["demo", "--arch", "mlp", "--tenants", "4", "--rows", "8", "--batches", "2"]


def test_the_demo_prints_its_table_and_a_passing_check(capsys):
    assert cli.main(TINY) == 0
    out = capsys.readouterr().out
    for line in ("jaxmt (space-time)", "exclusive access (1 model)", "time-only (1 program/tenant)", "-> OK"):
        assert line in out


def test_a_store_that_serves_the_wrong_weights_fails_the_check(monkeypatch, capsys):
    """Every tenant given tenant 0's weights: read back from the store, a reference would agree."""
    real_add = jaxmt.MultiTenantModel.add_tenant
    first = {}

    def add_tenant(self, tenant_id, params):
        real_add(self, tenant_id, first.setdefault("params", params))

    monkeypatch.setattr(jaxmt.MultiTenantModel, "add_tenant", add_tenant)
    assert cli.main(TINY) == 1
    assert "-> FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("option, message", [
    (["--tenants", "0"], "--tenants must be >= 1"),
    (["--rows", "-1"], "--rows must be >= 1"),
    (["--batches", "0"], "--batches must be >= 1"),
    (["--arch", "nope"], "error: "),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_bad_demo_options_are_one_error_line(option, message, capsys):
    assert cli.main([*TINY, *option]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["demo", "train", "soak"])
def test_ctrl_c_in_any_subcommand_is_exit_code_130_and_one_line(command, monkeypatch, capsys):
    """Ctrl-C stops a subcommand with the shell's code for SIGINT and one line, not a traceback."""
    module = __import__(cli.SUBCOMMANDS[command][0], fromlist=["run"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    assert cli.main([command]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"interrupted: {command} stopped before it finished"
