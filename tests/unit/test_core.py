"""The decision core, rule by rule (core.py's docstring lists them), on crafted packets."""

import pytest

from director.conntrack import NO_SLOT
from director.core import Action, Director
from director.drop_reasons import DropReason
from director.isakmp_state import State, Timeouts
from director.lab import craft
from director.packet import CREATE_CHILD_SA, Kind, QUICK, ip_to_int
from director.schedulers import RealServer
from director.service import ConfigError, Method, Service

VIP = ip_to_int("192.0.2.10")
RIPS = [ip_to_int(f"198.51.100.{i}") for i in (1, 2, 3)]
CLIENTS = [ip_to_int(f"203.0.113.{i}") for i in range(1, 20)]


def director(scheduler="rr", method=Method.DR, weights=(1, 1, 1), ah=True, **svc_kw):
    d = Director(capacity=1024)
    servers = {
        i: RealServer(id=i, addr=RIPS[i], weight=w, method=method)
        for i, w in enumerate(weights)
    }
    d.add_service(
        Service(
            id=1,
            vip=VIP,
            scheduler_name=scheduler,
            method=method,
            ah=ah,
            timeouts=Timeouts(init=10.0, established=100.0),
            servers=servers,
            **svc_kw,
        )
    )
    return d


def handshake(d, client, spi_i, spi_r, now=0.0, v1=False):
    """Initial packet, then the initiator's second message carrying the responder cookie."""
    v = d.decide(craft.ike(client, VIP, spi_i, v1=v1), now)
    assert v.action == Action.FORWARD and v.kind == Kind.IKE_INITIAL
    v2 = d.decide(craft.ike(client, VIP, spi_i, spi_r, v1=v1), now + 0.01)
    assert v2.action == Action.FORWARD and v2.rs == v.rs
    return v.rs


def test_rr_spreads_new_clients_and_later_packets_follow():
    d = director("rr")
    chosen = [handshake(d, CLIENTS[i], 100 + i, 900 + i) for i in range(6)]
    assert sorted(chosen) == [0, 0, 1, 1, 2, 2]
    for i in range(6):
        for pkt, kind in (
            (craft.ike(CLIENTS[i], VIP, 100 + i, 900 + i), Kind.IKE),
            (craft.esp(CLIENTS[i], VIP, spi=0x1000 + i), Kind.ESP),
            (craft.ah(CLIENTS[i], VIP, spi=0x2000 + i), Kind.AH),
        ):
            v = d.decide(pkt, 1.0)
            assert (v.action, v.kind, v.rs, v.addr) == (Action.FORWARD, kind, chosen[i], RIPS[chosen[i]])
    assert d.stats["scheduled"] == 6


def test_established_only_when_initiator_echoes_responder_cookie():
    d = director()
    d.decide(craft.ike(CLIENTS[0], VIP, 7), 0.0)
    s = d.table.lookup(1, CLIENTS[0], 7)
    assert d.table.view(s).state == State.INIT
    d.decide(craft.ike(CLIENTS[0], VIP, 7, 0xABC), 0.1)
    assert d.table.view(s).state == State.ESTABLISHED and d.table.view(s).spi_r == 0xABC


def test_ikev2_cookie_retry_keeps_init_and_the_real_server():
    d = director("rr")
    first = d.decide(craft.ike(CLIENTS[0], VIP, 7), 0.0)
    # the responder demanded a COOKIE: the client resends IKE_SA_INIT with a notify, SPI_r still 0
    retry = d.decide(craft.ike(CLIENTS[0], VIP, 7, body=b"\x00" * 40), 0.05)
    s = d.table.lookup(1, CLIENTS[0], 7)
    assert retry.rs == first.rs and d.table.view(s).state == State.INIT
    assert d.table.view(s).retransmits == 0  # a retry is not a retransmission
    assert d.stats["scheduled"] == 1 and len(d.table) == 1


def test_ikev1_nat_t_float_500_to_4500_keeps_real_server():
    d = director("rr")
    for i in range(2):  # occupy two servers so the third is not the default pick
        handshake(d, CLIENTS[10 + i], 50 + i, 60 + i)
    c, spi_i, spi_r = CLIENTS[0], 0x1234, 0x5678
    v = d.decide(craft.ike(c, VIP, spi_i, v1=True, sport=1024), 0.0)  # MM1 via a NAT, port 1024
    for _ in range(2):  # MM3, and again
        assert d.decide(craft.ike(c, VIP, spi_i, spi_r, v1=True, sport=1024), 0.1).rs == v.rs
    # MM5 floats to 4500 (the NAT maps a new port) behind the non-ESP marker
    v5 = d.decide(craft.ike(c, VIP, spi_i, spi_r, v1=True, sport=2048, natt=True), 0.2)
    assert (v5.action, v5.rs) == (Action.FORWARD, v.rs)
    s = d.table.lookup(1, c, spi_i)
    assert d.table.view(s).cport == 2048 and d.table.view(s).natt
    # quick mode, ESP-in-UDP and keepalives from the new port all follow
    assert d.decide(craft.ike(c, VIP, spi_i, spi_r, v1=True, sport=2048, natt=True, exchange=QUICK), 0.3).rs == v.rs
    assert d.decide(craft.esp_in_udp(c, VIP, 0xAA, sport=2048), 0.4).rs == v.rs
    ka = d.decide(craft.keepalive(c, VIP, sport=2048), 0.5)
    assert (ka.action, ka.kind, ka.rs) == (Action.FORWARD, Kind.NATT_KEEPALIVE, v.rs)


def test_ike_initial_on_4500_directly_is_scheduled():
    d = director()
    v = d.decide(craft.ike(CLIENTS[0], VIP, 5, sport=4500, natt=True), 0.0)
    assert (v.action, v.kind) == (Action.FORWARD, Kind.IKE_INITIAL)
    assert d.table.lookup(1, CLIENTS[0], 5) != NO_SLOT


def test_esp_and_ah_without_entry_get_protocol_unreachable():
    d = director()
    for pkt, kind in ((craft.esp(CLIENTS[0], VIP, 0x99), Kind.ESP), (craft.ah(CLIENTS[0], VIP, 0x98), Kind.AH)):
        v = d.decide(pkt, 0.0)
        assert (v.action, v.kind, v.reason) == (Action.ICMP_UNREACH, kind, DropReason.NO_ENTRY)
    v = d.decide(craft.esp_in_udp(CLIENTS[0], VIP, 0x97), 0.0)
    assert (v.action, v.reason) == (Action.ICMP_UNREACH, DropReason.NO_ENTRY)
    assert d.stats["icmp_unreach"] == 3 and len(d.table) == 0  # ESP creates no entry


def test_esp_for_an_init_entry_is_dropped_not_forwarded():
    d = director()
    d.decide(craft.ike(CLIENTS[0], VIP, 5, sport=4500, natt=True), 0.0)
    v = d.decide(craft.esp_in_udp(CLIENTS[0], VIP, 0x42), 0.1)
    assert (v.action, v.reason) == (Action.DROP, DropReason.ENTRY_NOT_ESTABLISHED)
    v = d.decide(craft.esp(CLIENTS[0], VIP, 0x42), 0.1)  # raw ESP: no ESTABLISHED entry either
    assert v.action == Action.ICMP_UNREACH


def test_rekey_with_new_cookies_stays_on_the_real_server():
    d = director("rr")
    rs = handshake(d, CLIENTS[0], 1, 2)
    for i in range(1, 6):  # other clients move the rr pointer around
        handshake(d, CLIENTS[i], 10 + i, 20 + i)
    # IKEv1: a new Main Mode (new initiator cookie) from the same client = reauthentication
    v = d.decide(craft.ike(CLIENTS[0], VIP, 3, v1=True), 5.0)
    assert v.rs == rs and d.stats["persisted"] == 1
    # IKEv2: after CREATE_CHILD_SA rekeyed the IKE SA, traffic uses new SPIs never seen initial
    v = d.decide(craft.ike(CLIENTS[0], VIP, 4, 5, exchange=CREATE_CHILD_SA), 6.0)
    assert (v.action, v.rs) == (Action.FORWARD, rs)
    s = d.table.lookup(1, CLIENTS[0], 4)
    assert d.table.view(s).state == State.ESTABLISHED and d.stats["adopted"] == 1


def test_unknown_non_initial_ike_from_unknown_client_is_dropped():
    d = director()
    v = d.decide(craft.ike(CLIENTS[0], VIP, 4, 5), 0.0)
    assert (v.action, v.reason) == (Action.DROP, DropReason.UNKNOWN_IKE_SA)
    assert len(d.table) == 0


def test_quiesced_server_keeps_its_clients_and_gets_no_new_ones():
    d = director("rr")
    rs = handshake(d, CLIENTS[0], 1, 2)
    d.set_weight(rs, 0)
    assert d.decide(craft.esp(CLIENTS[0], VIP, 9), 1.0).rs == rs
    assert d.decide(craft.ike(CLIENTS[0], VIP, 3, v1=True), 1.0).rs == rs  # its rekey stays
    others = {handshake(d, CLIENTS[i], 10 + i, 20 + i, now=2.0) for i in range(1, 7)}
    assert rs not in others and len(others) == 2


def test_quiesced_server_keeps_a_clients_new_conversations_without_quiescent_expiry():
    d = director("rr")
    rs = handshake(d, CLIENTS[0], 1, 2)
    d.set_weight(rs, 0)
    v = d.decide(craft.ike(CLIENTS[0], VIP, 3), 1.0)  # a new IKE SA of the same client
    assert v.rs == rs and d.stats["persisted"] == 1 and d.stats["rescheduled_quiesced"] == 0


@pytest.mark.parametrize("affinity", ["ip", "ip-port"])
def test_quiescent_expiry_schedules_a_clients_next_conversation_afresh(affinity):
    d = director("rr", expire_quiescent=True, affinity=affinity)
    rs = handshake(d, CLIENTS[0], 1, 2)
    other = handshake(d, CLIENTS[1], 5, 6)  # on another server: its persistence is untouched
    d.set_weight(rs, 0)
    v = d.decide(craft.ike(CLIENTS[0], VIP, 3), 1.0)  # the client's next new conversation
    assert v.action == Action.FORWARD and v.rs != rs
    assert d.stats["rescheduled_quiesced"] == 1
    # the live conversation stays on the quiesced server: IKE, ESP, AH
    assert d.decide(craft.ike(CLIENTS[0], VIP, 1, 2), 1.1).rs == rs
    assert d.decide(craft.esp(CLIENTS[0], VIP, 9), 1.2).rs == rs  # the only ESTABLISHED entry so far
    s = d.table.lookup(1, CLIENTS[0], 1)
    assert s != NO_SLOT and d.table.rs_of(s) == rs and d.table.state_of(s) == State.ESTABLISHED
    # the new conversation becomes the client's live state; later ones follow it (persisted)
    d.decide(craft.ike(CLIENTS[0], VIP, 3, 4), 1.3)
    assert d.decide(craft.esp(CLIENTS[0], VIP, 9), 1.35).rs == v.rs  # ESP follows the newest ESTABLISHED
    assert d.decide(craft.ike(CLIENTS[0], VIP, 7), 1.4).rs == v.rs
    assert d.stats["rescheduled_quiesced"] == 1
    assert d.decide(craft.ike(CLIENTS[1], VIP, 8), 1.5).rs == other  # persisted, not quiesced
    # weight back: nothing is expired any more
    d.set_weight(rs, 1)
    c = CLIENTS[2]
    first = handshake(d, c, 11, 12, now=2.0)
    assert d.decide(craft.ike(c, VIP, 13), 2.1).rs == first
    assert d.stats["rescheduled_quiesced"] == 1


def test_quiescent_expiry_leaves_overloaded_and_healthy_servers_alone():
    d = director("rr", expire_quiescent=True, weights=(1, 1, 1))
    rs = handshake(d, CLIENTS[0], 1, 2)
    srv = d.server(rs)
    srv.u_threshold, srv.overloaded = 1, True  # overloaded but weight 1: persistence holds (as IPVS)
    assert d.decide(craft.ike(CLIENTS[0], VIP, 3), 1.0).rs == rs
    assert d.stats["rescheduled_quiesced"] == 0 and d.stats["persisted"] == 1


def test_removed_server_clients_are_rescheduled_on_next_initial_and_counted():
    d = director("rr")
    rs = handshake(d, CLIENTS[0], 1, 2)
    d.remove_server(1, rs)
    v = d.decide(craft.esp(CLIENTS[0], VIP, 9), 1.0)
    assert (v.action, v.reason) == (Action.DROP, DropReason.REAL_SERVER_GONE)
    v = d.decide(craft.ike(CLIENTS[0], VIP, 3), 2.0)
    assert v.action == Action.FORWARD and v.rs != rs and v.rs in (0, 1, 2)
    assert d.stats["rescheduled_dead"] == 1


def test_down_server_init_conversation_is_rescheduled_on_retransmit():
    d = director("rr")
    v = d.decide(craft.ike(CLIENTS[0], VIP, 1), 0.0)
    d.set_up(v.rs, False)
    v2 = d.decide(craft.ike(CLIENTS[0], VIP, 1), 1.0)
    assert v2.rs != v.rs and d.stats["rescheduled_dead"] == 1


def test_passive_health_reschedules_an_unanswered_conversation():
    d = director("rr", retransmit_threshold=3)
    pkt = craft.ike(CLIENTS[0], VIP, 1)
    first = d.decide(pkt, 0.0).rs
    seen = [d.decide(pkt, float(t)).rs for t in (1, 2, 3, 4)]
    assert seen[:2] == [first, first]  # repeats 1 and 2 stay
    assert seen[2] != first  # the third repeat (threshold) moves it
    assert seen[3] == seen[2]  # and it stays on its new server
    assert d.stats["rescheduled_stuck"] == 1 and d.stuck_by_rs == {first: 1}
    s = d.table.lookup(1, CLIENTS[0], 1)
    assert d.table.view(s).rs == seen[2]


def test_server_counters_follow_the_table():
    d = director("wlc")
    rs = handshake(d, CLIENTS[0], 1, 2)
    d.decide(craft.ike(CLIENTS[1], VIP, 3), 0.0)
    servers = d.services[1].servers
    assert sum(r.active for r in servers.values()) == 1
    assert sum(r.inactive for r in servers.values()) == 1
    assert servers[rs].active == 1
    d.expire(15.0)  # the INIT entry times out
    assert sum(r.inactive for r in servers.values()) == 0
    d.expire(200.0)
    assert sum(r.active for r in servers.values()) == 0


def test_wlc_sends_new_clients_to_the_least_loaded_by_weight():
    d = director("wlc", weights=(1, 2, 3))
    for i in range(12):
        handshake(d, CLIENTS[i], 100 + i, 200 + i)
    active = [d.services[1].servers[i].active for i in range(3)]
    assert active == [2, 4, 6]


def test_ip_port_affinity_tells_apart_clients_behind_one_nat():
    nat_ip = CLIENTS[0]
    by_port = director("rr", affinity="ip-port")
    by_ip = director("rr", affinity="ip")
    for d in (by_port, by_ip):
        for k, port in enumerate((1024, 1025, 1026)):
            d.decide(craft.ike(nat_ip, VIP, 10 + k, sport=port), 0.0)
    assert len({by_port.table.rs_of(by_port.table.lookup(1, nat_ip, 10 + k)) for k in range(3)}) == 3
    assert len({by_ip.table.rs_of(by_ip.table.lookup(1, nat_ip, 10 + k)) for k in range(3)}) == 1


def test_nat_mode_requires_the_servers_responder_spi():
    d = director("rr", method=Method.NAT, ah=False)
    c = CLIENTS[0]
    v = d.decide(craft.ike(c, VIP, 1), 0.0)
    assert v.method == Method.NAT
    # a spoofed second message before any reply from the server is refused
    bad = d.decide(craft.ike(c, VIP, 1, 0x77), 0.01)
    assert (bad.action, bad.reason) == (Action.DROP, DropReason.RESPONDER_SPI_MISMATCH)
    # the real server answers (through the director: NAT mode) with responder SPI 0x55
    reply = craft.ike(RIPS[v.rs], c, 1, 0x55)  # source RIP, to the client
    r = d.decide_reply(reply, 0.02)
    assert (r.action, r.reply, r.addr) == (Action.FORWARD, True, VIP)
    assert d.decide(craft.ike(c, VIP, 1, 0x77), 0.03).reason == DropReason.RESPONDER_SPI_MISMATCH
    ok = d.decide(craft.ike(c, VIP, 1, 0x55), 0.04)
    assert ok.action == Action.FORWARD
    assert d.table.state_of(d.table.lookup(1, c, 1)) == State.ESTABLISHED


def test_nat_service_refuses_ah_at_configuration_time():
    with pytest.raises(ConfigError, match="service.ah"):
        director(method=Method.NAT, ah=True)
    d = director(method=Method.NAT, ah=False)
    v = d.decide(craft.ah(CLIENTS[0], VIP, 0x33), 0.0)
    assert v.action == Action.ICMP_UNREACH


def test_malformed_packets_are_counted_and_change_nothing():
    d = director()
    rs = handshake(d, CLIENTS[0], 1, 2)
    before = list(d.table.entries())
    good = craft.ike(CLIENTS[1], VIP, 5)
    bad = [
        good[:30],  # truncated IKE
        good[:20] + good[20:28] + b"\x00" * 10,  # lying lengths
        craft.esp(CLIENTS[0], VIP, 0),  # zero SPI
        b"\x45" + b"\x00" * 5,  # truncated IP
        b"",
    ]
    for pkt in bad:
        v = d.decide(pkt, 1.0)
        assert v.action == Action.DROP and v.reason != 0
    assert list(d.table.entries()) == before
    assert sum(d.drops) == len(bad)
    assert d.decide(craft.esp(CLIENTS[0], VIP, 9), 1.0).rs == rs


def test_not_ours_passes():
    d = director()
    other_vip = craft.ike(CLIENTS[0], ip_to_int("192.0.2.99"), 1)
    assert d.decide(other_vip, 0.0).action == Action.PASS
    from director.packet import build_ipv4_udp

    dns = build_ipv4_udp(CLIENTS[0], VIP, 5353, 53, b"x")
    assert d.decide(dns, 0.0).action == Action.PASS
    assert len(d.table) == 0


def test_no_available_server_drops_initial():
    d = director(weights=(0, 0, 0))
    v = d.decide(craft.ike(CLIENTS[0], VIP, 1), 0.0)
    assert (v.action, v.reason) == (Action.DROP, DropReason.NO_REAL_SERVER)


def test_config_errors_name_the_field():
    d = director()
    with pytest.raises(ConfigError, match="service.id"):
        d.add_service(Service(id=1, vip=VIP + 1))
    with pytest.raises(ConfigError, match="service.vip"):
        d.add_service(Service(id=2, vip=VIP))
    with pytest.raises(ConfigError, match="service.scheduler"):
        Service(id=3, vip=VIP + 2, scheduler_name="nope")
    with pytest.raises(ConfigError, match="server.weight"):
        d.set_weight(0, 70000)
    with pytest.raises(ConfigError, match="server.id"):
        d.add_server(1, RealServer(id=0, addr=RIPS[0]))


def test_client_projection_collects_what_the_fast_path_must_resync():
    d = director("rr")
    p = d.client_projection()
    d.decide(craft.ike(CLIENTS[0], VIP, 1, sport=1024), 0.0)
    assert p.pending == set()  # INIT entries are not in the fast path
    d.decide(craft.ike(CLIENTS[0], VIP, 1, 2, sport=1024), 0.1)
    assert p.pending == {(1, CLIENTS[0], 1024)}
    p.pending.clear()
    d.decide(craft.ike(CLIENTS[0], VIP, 1, 2, sport=2048, natt=True), 0.2)  # float: old and new port
    assert p.pending == {(1, CLIENTS[0], 1024), (1, CLIENTS[0], 2048)}
    p.pending.clear()
    d.expire(500.0)
    assert p.pending == {(1, CLIENTS[0], 2048)}


def test_client_projection_drain_gives_each_key_its_route():
    d = director("rr")
    p = d.client_projection()
    d.decide(craft.ike(CLIENTS[0], VIP, 1, sport=4500, natt=True), 0.0)
    d.decide(craft.ike(CLIENTS[0], VIP, 1, 2, sport=4500, natt=True), 0.1)
    rs = d.table.view(next(d.table.slots())).rs
    assert sorted(p.drain(), key=str) == sorted([(VIP, CLIENTS[0], 0, rs), (VIP, CLIENTS[0], 4500, rs)], key=str)
    assert p.pending == set() and p.drain() == []
    d.expire(500.0)
    assert sorted(p.drain(), key=str) == sorted([(VIP, CLIENTS[0], 0, None), (VIP, CLIENTS[0], 4500, None)], key=str)
    d.unlisten(p)
    d.decide(craft.ike(CLIENTS[1], VIP, 3, sport=500), 600.0)
    d.decide(craft.ike(CLIENTS[1], VIP, 3, 4, sport=500), 600.1)
    assert p.pending == set()  # no longer listening


def test_new_entry_limits_per_source_and_global():
    d = Director(capacity=1024, new_per_source=2.0, new_rate=5.0)
    d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", servers={0: RealServer(id=0, addr=RIPS[0])}))
    verdicts = [d.decide(craft.ike(CLIENTS[0], VIP, 100 + i), 0.0).reason for i in range(4)]
    assert verdicts == [0, 0, DropReason.SOURCE_RATE_LIMITED, DropReason.SOURCE_RATE_LIMITED]  # burst 2 per source
    others = [d.decide(craft.ike(CLIENTS[1 + i], VIP, 200 + i), 0.0).reason for i in range(5)]
    assert others == [0, 0, 0, DropReason.RATE_LIMITED, DropReason.RATE_LIMITED]  # global burst 5
    # a known conversation's retransmit and ESP are never limited
    assert d.decide(craft.ike(CLIENTS[0], VIP, 100), 0.1).action == Action.FORWARD
    assert d.decide(craft.ike(CLIENTS[0], VIP, 300), 1.0).action == Action.FORWARD  # refilled
    assert d.drops[DropReason.SOURCE_RATE_LIMITED] == 2 and d.drops[DropReason.RATE_LIMITED] == 2


def test_upper_and_lower_thresholds_switch_a_server_off_and_back_on():
    """ipvsadm -x/-y (u_threshold/l_threshold): at u_threshold connections (active + inactive) the
    server takes no new client; it takes them again only once below l_threshold (hysteresis), or
    below 3/4 of u_threshold when l_threshold is 0. 40 new clients per phase under rr over two
    servers: a server wrongly left in would get about half of them."""
    d = Director(capacity=1024)
    servers = {0: RealServer(id=0, addr=RIPS[0], weight=1, u_threshold=4, l_threshold=2),
               1: RealServer(id=1, addr=RIPS[1], weight=1)}
    d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", method=Method.DR,
                          timeouts=Timeouts(init=10.0, established=100.0), servers=servers))
    clients = iter(ip_to_int("10.9.0.0") + i for i in range(1000))

    def new_clients(n):
        got = []
        for _ in range(n):
            v = d.decide(craft.ike(next(clients), VIP, 77), 0.0)
            assert v.action == Action.FORWARD
            got.append(v.rs)
        return got

    first = new_clients(40)
    assert first.count(0) == 4 and first[:8].count(0) == 4  # rr until rs0 holds 4: then none
    assert d.server(0).overloaded and not d.server(1).overloaded
    on_rs0 = [s for s in d.table.slots() if d.table.rs[s] == 0]
    for s in on_rs0[:2]:  # down to 2 = l_threshold: not below it yet, still off
        d.table.remove(s)
    assert new_clients(40).count(0) == 0 and d.server(0).overloaded
    d.table.remove(on_rs0[2])  # 1 < l_threshold: back on
    assert not d.server(0).overloaded
    back = new_clients(40)
    assert back.count(0) == 3 and d.server(0).overloaded  # it fills to 4 again, then off
    # l_threshold 0: back on below 3/4 of u_threshold (3)
    d.change_service(1, update=[(0, {"weight": 1, "method": "", "u_threshold": 4, "l_threshold": 0})])
    on_rs0 = [s for s in d.table.slots() if d.table.rs[s] == 0]
    d.table.remove(on_rs0[0])  # 3: not below 3
    assert d.server(0).overloaded and new_clients(10).count(0) == 0
    d.table.remove(on_rs0[1])  # 2 < 3
    assert not d.server(0).overloaded and new_clients(10).count(0) == 2
