"""The forwarding method is parsed once, and the rule "AH cannot cross NAT" has one wording
wherever it is broken: a config file, a control request, a hand-made change of the director."""

import pytest

from director import config, reconcile
from director.core import Director
from director.forwarding.method import AH_ACROSS_NAT, Method, ah_across_nat
from director.packet import ip_to_int
from director.schedulers import RealServer
from director.service import ConfigError, Service

VIP = ip_to_int("192.0.2.10")


def test_parse_takes_names_and_ipvsadm_letters_and_names_the_choices():
    assert [Method.parse(x) for x in ("dr", "G", "tun", "i", "NAT", "m")] == [
        Method.DR, Method.DR, Method.TUN, Method.TUN, Method.NAT, Method.NAT]
    assert [m.label for m in Method] == ["dr", "tun", "nat"]
    with pytest.raises(ValueError, match="dr, tun, nat"):
        Method.parse("masq")


def test_ah_across_nat_says_where():
    assert ah_across_nat(False, Method.NAT, [Method.NAT]) is None
    assert ah_across_nat(True, Method.DR, [None, Method.TUN]) is None
    assert ah_across_nat(True, Method.NAT, [None]) == -1
    assert ah_across_nat(True, Method.DR, [None, Method.TUN, Method.NAT, Method.NAT]) == 2


def test_the_config_holds_methods_and_names_the_field_that_breaks_the_rule():
    cfg = config.parse('[[service]]\nvip = "192.0.2.10"\nmethod = "tun"\n'
                       '[[service.server]]\naddress = "192.0.2.2"\n'
                       '[[service.server]]\naddress = "192.0.2.3"\nmethod = "dr"\n')
    (s,) = cfg.services
    assert s.method is Method.TUN and [r.method for r in s.servers] == [None, Method.DR]
    assert config.to_dict(cfg)["service"][0]["method"] == "tun"
    assert config.from_dict(config.to_dict(cfg)) == cfg
    with pytest.raises(config.ConfigErrors) as e:
        config.parse('[[service]]\nvip = "192.0.2.10"\n[[service.server]]\naddress = "192.0.2.2"\n'
                     '[[service.server]]\naddress = "192.0.2.3"\nmethod = "nat"\n')
    assert e.value.errors == [f"service[0].server[1].method: {AH_ACROSS_NAT}"]
    with pytest.raises(config.ConfigErrors) as e:
        config.parse('[[service]]\nvip = "192.0.2.10"\nmethod = "masq"\n')
    assert e.value.errors == ["service[0].method: must be one of dr, tun, nat, got 'masq'"]
    assert config.parse('[[service]]\nvip = "192.0.2.10"\nmethod = "nat"\n').services[0].ah is False


def test_the_director_and_the_reconciler_say_the_same():
    d = Director(capacity=64)
    d.add_service(Service(id=1, vip=VIP, servers={0: RealServer(id=0, addr=VIP + 1)}))
    with pytest.raises(ConfigError) as e:
        d.add_server(1, RealServer(id=1, addr=VIP + 2, method=Method.NAT))
    assert str(e.value) == f"server.method: {AH_ACROSS_NAT}"
    assert list(d.services[1].servers) == [0]  # refused before anything changed
    with pytest.raises(ConfigError) as e:
        Service(id=2, vip=VIP + 9, method=Method.NAT, ah=True)
    assert str(e.value) == f"service.ah: {AH_ACROSS_NAT}"
    hand_made = config.Config(daemon=config.DaemonConfig(), services=(config.ServiceConfig(
        vip="192.0.2.10", servers=(config.ServerConfig("192.0.2.11", method=Method.NAT),)),))
    with pytest.raises(ConfigError) as e:
        reconcile.plan(d, hand_made)
    assert str(e.value) == f"service[0].server[0].method: {AH_ACROSS_NAT}"
    new_service = config.Config(daemon=config.DaemonConfig(), services=(
        config.ServiceConfig(vip="192.0.2.10"),
        config.ServiceConfig(vip="192.0.2.20", method=Method.NAT, ah=True)))
    with pytest.raises(ConfigError) as e:
        reconcile.plan(d, new_service)
    assert str(e.value) == f"service[1].ah: {AH_ACROSS_NAT}"
