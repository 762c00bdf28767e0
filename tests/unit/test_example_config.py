"""deploy/vpn-director.example.toml shows every setting the config checker knows, and passes `check`
once its sync key is set.

The schema is the checker's own: ``_Checker.unknown(path, table, allowed)`` is where
director/config.py says which keys a table may hold, so the test records those calls while the
example is parsed, instead of keeping a copy of the key lists. A table the example leaves out
never reaches ``unknown``, but its name is an allowed key of its parent, so it shows up missing
there.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

from director import config, reconcile
from director.core import Director

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "vpn-director.example.toml"


def checked_tables(text: str, monkeypatch) -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(allowed keys per table, keys the example sets per table, errors); table paths without
    indexes ("service.server" for every service[i].server[j])."""
    allowed: dict[str, set[str]] = {}
    present: dict[str, set[str]] = {}
    real_unknown = config._Checker.unknown

    def recording_unknown(self, path, table, keys):
        name = re.sub(r"\[\d+\]", "", path)
        assert allowed.setdefault(name, set(keys)) == set(keys), f"{name}: allowed keys differ between tables"
        present.setdefault(name, set()).update(table)
        return real_unknown(self, path, table, keys)

    monkeypatch.setattr(config._Checker, "unknown", recording_unknown)
    try:
        config.parse(text)
        errors = []
    except config.ConfigErrors as e:
        errors = e.errors
    return allowed, present, errors


def with_key(text: str) -> str:
    key = secrets.token_hex(32)
    out, n = re.subn(r'(?m)^key = "[^"]*"$', f'key = "{key}"', text)
    assert n == 1, "the example should have exactly one key = line, in [daemon.sync]"
    return out


def test_example_sets_every_key_of_every_table(monkeypatch):
    allowed, present, errors = checked_tables(with_key(EXAMPLE.read_text()), monkeypatch)
    assert errors == []
    assert {"", "daemon", "daemon.sync", "service", "service.timeouts", "service.soft_expiry", "service.health",
            "service.server"} <= set(allowed), sorted(allowed)  # the recorder saw the nested tables
    missing = {t: sorted(allowed[t] - present[t]) for t in allowed if allowed[t] - present[t]}
    assert not missing, f"settings the example does not show: {missing}"


def test_example_fails_check_only_on_the_placeholder_key():
    with pytest.raises(config.ConfigErrors) as e:
        config.parse(EXAMPLE.read_text())
    assert [err.split(":")[0] for err in e.value.errors] == ["daemon.sync.key"]


def test_example_with_a_key_passes_what_check_does():
    cfg = config.parse(with_key(EXAMPLE.read_text()))
    reconcile.plan(Director(1), cfg)  # `vpn-director check`: every service and scheduler built
    assert cfg.daemon.sync is not None and len(cfg.services) >= 2


def test_recorder_sees_a_missing_setting(monkeypatch):
    """The comparison can fail: drop one daemon key from the example and it is reported."""
    text = re.sub(r"(?m)^icmp_rate = .*$", "", with_key(EXAMPLE.read_text()))
    allowed, present, _ = checked_tables(text, monkeypatch)
    assert allowed["daemon"] - present["daemon"] == {"icmp_rate"}
