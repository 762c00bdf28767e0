"""Control-socket requests edit the desired config; a bad one is refused in one line naming the field."""

import pytest

from director.config import parse, to_dict
from director.control import RequestError, mutate
from tests.configs import TWO_SERVERS

BASE = TWO_SERVERS


@pytest.mark.parametrize("req, error", [
    ({"cmd": "add-service", "service": {"vip": "192.0.2.10"}}, "vip: service 192.0.2.10 exists"),
    ({"cmd": "add-service", "service": {"vip": "192.0.2.11", "scheduler": "nope"}}, "service.scheduler: must be one of"),
    ({"cmd": "add-service", "service": {"vip": "192.0.2.11", "method": "nat", "ah": True}}, "service.ah: AH cannot cross NAT"),
    ({"cmd": "add-service", "service": {"vip": "bad"}}, "vip: not an IPv4 or IPv6 address"),
    ({"cmd": "add-server", "vip": "192.0.2.10", "server": {"address": "198.51.100.1"}}, "address: real server 198.51.100.1 exists"),
    ({"cmd": "add-server", "vip": "192.0.2.10", "server": {"address": "198.51.100.9", "weight": 70000}}, "service.server[2].weight: must be 0..65535"),
    ({"cmd": "edit-server", "vip": "192.0.2.10", "address": "198.51.100.9", "changes": {"weight": 1}}, "address: no real server 198.51.100.9"),
    ({"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"vip": "192.0.2.1"}}, "changes.vip: not an editable"),
    ({"cmd": "del-service", "vip": "192.0.2.99"}, "vip: no service 192.0.2.99"),
    ({"cmd": "set-timeouts"}, "set-timeouts: give init"),
    ({"cmd": "frobnicate"}, "cmd: unknown command"),
])
def test_bad_requests_name_the_field(req, error):
    cfg = parse(BASE)
    with pytest.raises(RequestError) as e:
        mutate(cfg, req)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_set_timeouts_and_restore_round_trip():
    cfg = parse(BASE)
    new = mutate(cfg, {"cmd": "set-timeouts", "established": 500})
    assert (new.services[0].init_timeout, new.services[0].established_timeout) == (10.0, 500.0)
    saved = to_dict(new)["service"]
    again = mutate(mutate(new, {"cmd": "clear"}), {"cmd": "restore", "services": saved})
    assert again == new
    with pytest.raises(RequestError, match="services: must be list"):
        mutate(cfg, {"cmd": "restore", "services": {}})


def test_edit_service_changes_only_the_ingress_keys_given():
    cfg = mutate(parse(BASE), {"cmd": "edit-service", "vip": "192.0.2.10",
                               "changes": {"ingress": {"esp_pps": 50, "ike_pps": 20}}})
    assert to_dict(cfg)["service"][0]["ingress"] == {"esp_pps": 50, "ike_pps": 20}
    cfg = mutate(cfg, {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"ingress": {"esp_pps": 0, "burst": 5}}})
    assert to_dict(cfg)["service"][0]["ingress"] == {"ike_pps": 20, "burst": 5}
    with pytest.raises(RequestError, match=r"^service\.ingress\.ah_pps: must be 0\.\.1000000"):
        mutate(cfg, {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"ingress": {"ah_pps": -1}}})
