"""Property tests of the config loader: any TOML value in any field gets an error naming that field.

The loader (director.config) and the whole validation `check` and `run` share (reconcile.validate)
either accept a config or refuse it with lines that each name a field; nothing else escapes, and
the refusal names the field that was changed (or one inside it).
"""

import copy
import datetime as dt
import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from director import reconcile
from director.config import NUM_MAX, ConfigErrors, from_dict, parse, to_dict

BASE = {
    "daemon": {
        "client_interface": "eth0", "server_interface": "eth1", "queue": 0, "fail_open": False,
        "capacity": 1024, "icmp_rate": 100.0, "new_entries_rate": 0.0, "new_entries_per_source": 0.0,
        "drop_entry_threshold": 0.9, "control_socket": "/run/vpn-director/control.sock",
        "metrics": "127.0.0.1:9100", "bpf_pin_dir": "/sys/fs/bpf/vpn-director", "fastpath_hook": "tc",
        "fastpath_fib": "cached",
        "sync": {"peer": "192.0.2.2", "port": 8514, "key": "00112233445566778899aabbccddeeff", "role": "auto"},
    },
    "service": [{
        "vip": "192.0.2.10", "scheduler": "mh", "scheduler_options": {"table_size": 251}, "method": "dr",
        "affinity": "ip", "ah": True, "timeouts": {"init": 10.0, "established": 100.0},
        "retransmit_threshold": 3, "soft_expiry": {"limit": 0, "grace": 0.0},
        "health": {"interval": 5.0, "timeout": 2.0, "rise": 2, "fall": 3, "expire_on_down": False, "icmp": False},
        "server": [{"address": "198.51.100.1", "weight": 1, "method": "", "u_threshold": 0, "l_threshold": 0}],
    }],
}


def _paths(node, prefix=()):
    """Every (path, printed name) of BASE, tables and their leaves."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))
    if prefix:
        yield prefix


def _name(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


PATHS = sorted(set(_paths(BASE)), key=_name)

# what tomllib can hand the loader: every TOML type, with the numbers that hurt
toml_scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63 - 1, -(2**63)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 5e-324])
    | st.text(max_size=20)
    | st.sampled_from(["", "rr", "nat", "tc", "0.0.0.0", "255.255.255.255", "::1", "1.2.3.4:99999"])
    | st.booleans()
    | st.datetimes() | st.dates() | st.times()
    | st.just(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _replace(path, value) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return raw


def test_the_base_config_is_valid():
    reconcile.validate(from_dict(copy.deepcopy(BASE)))


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(PATHS), toml_values)
@example(("service", 0, "timeouts", "init"), math.inf)
@example(("daemon", "new_entries_rate"), math.inf)
@example(("daemon", "new_entries_rate"), 1e308)
@example(("service", 0, "scheduler_options", "table_size"), math.inf)
@example(("service", 0, "health", "interval"), math.nan)
def test_any_value_in_any_field_is_accepted_or_refused_naming_it(path, value):
    name = _name(path)
    try:
        cfg = from_dict(_replace(path, value))
        reconcile.validate(cfg)
    except ConfigErrors as e:
        assert e.errors and all(": " in line and "\n" not in line for line in e.errors)
        assert any(_names(line, name) for line in e.errors), (name, e.errors)
    except ValueError as e:  # the reconciler's one line (ConfigError), the scheduler's options included
        line = str(e)
        assert "\n" not in line and line.startswith("service[0]"), line
        assert _names(line, name) or (name.startswith("service[0].scheduler") and "scheduler" in line), (name, line)
    else:  # accepted: every number in it is one a timer, a bucket or a map value can hold
        assert all(math.isfinite(x) and abs(x) <= NUM_MAX for x in _numbers(to_dict(cfg))), (name, value)


def _numbers(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _numbers(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _numbers(v)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


def _names(line: str, name: str) -> bool:
    """The error line names ``name``, a field inside it, or the table holding it (a cross-field
    rule such as timeouts.established >= timeouts.init names its sibling)."""
    field = line.split(": ", 1)[0]
    parent = name.rsplit(".", 1)[0] if "." in name else name
    return field == name or field.startswith(name + ".") or field.startswith(name + "[") or (
        field.startswith(parent + ".") or field.startswith(parent + "[")) or field == parent


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_config_or_config_errors(text):
    try:
        parse(text)
    except ConfigErrors as e:
        assert e.errors and all("\n" not in line for line in e.errors)
