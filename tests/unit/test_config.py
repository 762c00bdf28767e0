"""The config file: every problem found and named by its path at once; non-finite and oversized
numbers refused; `check` refuses what `run` refuses."""

import json

import pytest

from director import main, reconcile
from director.config import NUM_MAX, ConfigErrors, parse
from director.control import RequestError, mutate

SERVICE = """
[[service]]
vip = "192.0.2.10"
scheduler = "rr"
[[service.server]]
address = "198.51.100.1"
"""


@pytest.mark.parametrize("setting, field", [
    ("[daemon]\nnew_entries_rate = inf\n", "daemon.new_entries_rate: must be a finite number, got inf"),
    ("[daemon]\nnew_entries_per_source = +inf\n", "daemon.new_entries_per_source: must be a finite number, got inf"),
    ("[daemon]\nicmp_rate = nan\n", "daemon.icmp_rate: must be a finite number, got nan"),
    ("[daemon]\ndrop_entry_threshold = -inf\n", "daemon.drop_entry_threshold: must be a finite number, got -inf"),
    ("[daemon]\nnew_entries_rate = 1e308\n", "daemon.new_entries_rate: must be at most 1e+09, got 1e+308"),
    ("[daemon]\nicmp_rate = 10_000_000_000\n", "daemon.icmp_rate: must be at most 1e+09, got 1e+10"),
])
def test_toml_non_finite_and_huge_daemon_numbers_are_refused(setting, field):
    with pytest.raises(ConfigErrors) as e:
        parse(setting + SERVICE)
    assert e.value.errors == [field]


@pytest.mark.parametrize("table, field", [
    ("timeouts = { init = inf }", "service[0].timeouts.init: must be a finite number, got inf"),
    ("timeouts = { established = nan }", "service[0].timeouts.established: must be a finite number, got nan"),
    ("soft_expiry = { limit = 10, grace = inf }", "service[0].soft_expiry.grace: must be a finite number, got inf"),
    ("health = { interval = inf }", "service[0].health.interval: must be a finite number, got inf"),
])
def test_toml_non_finite_service_numbers_are_refused(table, field):
    text = SERVICE.replace('scheduler = "rr"\n', f'scheduler = "rr"\n{table}\n')
    with pytest.raises(ConfigErrors) as e:
        parse(text)
    assert field in e.value.errors


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999", "1" + "0" * 400])
def test_control_json_non_finite_and_huge_numbers_are_refused(literal):
    cfg = parse(SERVICE)
    req = json.loads('{"v": 1, "cmd": "set-timeouts", "init": %s}' % literal)
    with pytest.raises(RequestError) as e:
        mutate(cfg, req)
    msg = str(e.value)
    assert msg.startswith("service[0].timeouts.init: must be") and "\n" not in msg


def test_the_largest_number_is_accepted_and_one_more_is_not():
    ok = parse(f"[daemon]\nnew_entries_rate = {NUM_MAX:.0f}\n" + SERVICE)
    assert ok.daemon.new_entries_rate == NUM_MAX
    with pytest.raises(ConfigErrors):
        parse(f"[daemon]\nnew_entries_rate = {NUM_MAX + 1:.0f}\n" + SERVICE)


def test_validate_builds_what_run_builds():
    d = reconcile.validate(parse("[daemon]\nnew_entries_rate = 50\n" + SERVICE))
    assert len(d.services) == 1 and d._new_limit is not None


@pytest.mark.parametrize("text, line", [
    ("[daemon]\nnew_entries_rate = inf\n" + SERVICE, "daemon.new_entries_rate: must be a finite number"),
    ("[[service]]\nvip = \"192.0.2.10\"\ntimeouts = { init = 1e999 }\n", "service[0].timeouts.init: must be a finite"),
    (SERVICE.replace('"rr"', '"mh"\nscheduler_options = { bogus = 1 }'), "service[0].scheduler: scheduler 'mh' has no option"),
])
def test_check_refuses_what_run_refuses(tmp_path, capsys, text, line):
    path = tmp_path / "director.toml"
    path.write_text(text)
    assert main.main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0]
    # run refuses it the same way, before it touches the kernel
    assert main.main(["run", "--config", str(path), "--dataplane", "nfqueue"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == err


def test_config_errors_list_every_problem_at_once():
    with pytest.raises(ConfigErrors) as e:
        parse('[daemon]\nqueue = -1\n[[service]]\nvip = "x"\n[[service.server]]\nweight = 1\n')
    assert e.value.errors == [
        "daemon.queue: must be 0..65534, got -1",
        "service[0].vip: not an IPv4 address: 'x'",
        "service[0].server[0].address: missing",
    ]


BGP = '[daemon.bgp]\nsocket = "/run/bird/bird.ctl"\ninclude = "/etc/bird/vips.conf"\n'


def test_bgp_settings_are_checked_and_named():
    cfg = parse(BGP + "drain = true\nshutdown_wait = 2.5\n" + SERVICE.replace('"rr"', '"rr"\ndrain = true'))
    assert (cfg.daemon.bgp.drain, cfg.daemon.bgp.shutdown_wait, cfg.services[0].drain) == (True, 2.5, True)
    assert parse(BGP + SERVICE).daemon.bgp.shutdown_wait == 1.0
    with pytest.raises(ConfigErrors) as e:
        parse('[daemon.bgp]\nsocket = "bird.ctl"\ndrain = "yes"\nshutdown_wait = 61\nport = 179\n'
              + SERVICE.replace('"rr"', '"rr"\ndrain = 1'))
    assert e.value.errors == [
        "daemon.bgp.port: unknown setting",
        "daemon.bgp.socket: must be an absolute path, got 'bird.ctl'",
        "daemon.bgp.include: missing",
        "daemon.bgp.shutdown_wait: must be at most 60 seconds, got 61",
        "daemon.bgp.drain: must be true or false, got 'yes'",
        "service[0].drain: must be true or false, got 1",
    ]


def test_a_bgp_config_round_trips_and_drain_is_editable():
    from director.config import from_dict, to_dict

    cfg = parse(BGP + SERVICE)
    assert from_dict(to_dict(cfg)) == cfg
    drained = mutate(cfg, {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"drain": True}})
    assert drained.services[0].drain and from_dict(to_dict(drained)) == drained
    with pytest.raises(RequestError, match="service.drain: must be true or false"):
        mutate(cfg, {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"drain": "on"}})


def test_check_warns_when_a_multi_director_service_does_not_choose_consistently(tmp_path, capsys):
    path = tmp_path / "director.toml"
    path.write_text(BGP + SERVICE + SERVICE.replace("192.0.2.10", "192.0.2.20").replace('"rr"', '"mh"'))
    assert main.main(["check", "--config", str(path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vpn-director: warning: service[0].scheduler: 'rr' is not the same on every director; with "
                   "[daemon.bgp] use mh (or sh, dh) so every director picks the same real server for a new conversation"]
    path.write_text(SERVICE)  # a lone director: no warning
    assert main.main(["check", "--config", str(path)]) == 0
    assert capsys.readouterr().err == ""


def test_expire_quiescent_and_mh_options_are_taken_checked_and_reconciled():
    options = '\nscheduler_options = { port = true, fallback = false }'
    text = SERVICE.replace('"rr"', '"mh"\nexpire_quiescent = true' + options)
    cfg = parse(text)
    assert cfg.services[0].expire_quiescent is True
    d = reconcile.validate(cfg)
    svc = next(iter(d.services.values()))
    assert svc.expire_quiescent is True and (svc.scheduler.port, svc.scheduler.fallback) == (True, False)
    # a change of the setting alone is a field change of the running service, nothing else
    p = reconcile.plan(d, parse(SERVICE.replace('"rr"', '"mh"' + options)))
    assert [c.fields for c in p.change] == [{"expire_quiescent": False}] and p.change[0].scheduler is None
    with pytest.raises(ConfigErrors) as e:
        parse(SERVICE.replace('"rr"', '"rr"\nexpire_quiescent = 1'))
    assert e.value.errors == ["service[0].expire_quiescent: must be true or false, got 1"]
    bad = mutate(parse(SERVICE), {"cmd": "edit-service", "vip": "192.0.2.10",
                                  "changes": {"scheduler": "mh", "scheduler_options": {"port": "yes"}}})
    message = r"service\[0\]\.scheduler: scheduler 'mh': option 'port' must be true or false"
    with pytest.raises(ValueError, match=message):
        reconcile.validate(bad)
