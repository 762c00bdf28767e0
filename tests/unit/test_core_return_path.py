"""The return path through the director (DR/TUN, ``return_path = "director"``) in the pure core:
replies from the VIP judged by their conversation and sender, and conversations validated by them."""

import pytest

from director.conntrack import NO_RS, Table
from director.core import Action, Director
from director.drop_reasons import DropReason
from director.isakmp_state import State, Timeouts
from director.lab import craft
from director.packet import build_ipv4, build_ipv4_udp, Kind, ip_to_int
from director.schedulers import RealServer
from director.service import ConfigError, Method, Service

VIP = ip_to_int("192.0.2.10")
RIPS = [ip_to_int(f"198.51.100.{i}") for i in (1, 2, 3)]
CLIENTS = [ip_to_int(f"203.0.113.{i}") for i in range(1, 50)]


def director(return_path="director", method=Method.DR, capacity=1024):
    d = Director(capacity=capacity)
    servers = {i: RealServer(id=i, addr=RIPS[i], weight=1) for i in range(3)}
    d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", method=method, return_path=return_path,
                          timeouts=Timeouts(init=10.0, established=100.0), servers=servers))  # fmt: skip
    return d


def answer(d, client, spi_i, spi_r, rs, now=0.01, sender=None):
    """The real server's IKE answer from the VIP (sender: its id unless given)."""
    return d.decide_reply(craft.ike(VIP, client, spi_i, spi_r), now, rs if sender is None else sender)


def connect(d, client, spi_i, spi_r, now=0.0):
    v = d.decide(craft.ike(client, VIP, spi_i), now)
    assert v.action == Action.FORWARD
    a = answer(d, client, spi_i, spi_r, v.rs, now + 0.01)
    assert (a.action, a.reply, a.addr, a.method) == (Action.FORWARD, True, client, Method.DR)
    v2 = d.decide(craft.ike(client, VIP, spi_i, spi_r), now + 0.02)
    assert v2.action == Action.FORWARD and v2.rs == v.rs
    return v.rs


def state(d, client, spi_i):
    t = d.table
    return t.state_of(t.lookup(1, client, spi_i))


def test_established_only_with_the_responder_spi_the_server_sent():
    d = director()
    c = CLIENTS[0]
    v = d.decide(craft.ike(c, VIP, 1), 0.0)
    guess = d.decide(craft.ike(c, VIP, 1, 0x99), 0.01)  # before any answer
    assert (guess.action, guess.reason) == (Action.DROP, DropReason.RESPONDER_SPI_MISMATCH)
    assert answer(d, c, 1, 0x77, v.rs).action == Action.FORWARD
    assert d.decide(craft.ike(c, VIP, 1, 0x99), 0.02).reason == DropReason.RESPONDER_SPI_MISMATCH
    assert state(d, c, 1) == State.INIT
    ok = d.decide(craft.ike(c, VIP, 1, 0x77), 0.03)
    assert (ok.action, ok.rs) == (Action.FORWARD, v.rs)
    assert state(d, c, 1) == State.ESTABLISHED
    assert d.drops[DropReason.RESPONDER_SPI_MISMATCH] == 2


def test_direct_return_path_establishes_on_any_echo_as_before():
    d = director("direct")
    c = CLIENTS[0]
    d.decide(craft.ike(c, VIP, 1), 0.0)
    assert d.decide(craft.ike(c, VIP, 1, 0x99), 0.01).action == Action.FORWARD
    assert state(d, c, 1) == State.ESTABLISHED


def test_replies_of_a_conversation_go_to_the_client_only_from_its_server():
    d = director()
    c = CLIENTS[1]
    rs = connect(d, c, 5, 0x55)
    other = (rs + 1) % 3
    for pkt, kind in ((craft.esp(VIP, c, 0x1000), Kind.ESP), (craft.ah(VIP, c, 0x1001), Kind.AH),
                      (craft.ike(VIP, c, 5, 0x55), Kind.IKE)):  # fmt: skip
        ok = d.decide_reply(pkt, 1.0, rs)
        assert (ok.action, ok.kind, ok.rs, ok.addr, ok.reply) == (Action.FORWARD, kind, rs, c, True)
        for sender in (other, NO_RS):
            bad = d.decide_reply(pkt, 1.0, sender)
            assert (bad.action, bad.reason) == (Action.DROP, DropReason.RETURN_WRONG_SERVER)
    assert d.drops[DropReason.RETURN_WRONG_SERVER] == 6


def test_esp_in_udp_replies_follow_the_clients_nat_t_port():
    d = director()
    c = CLIENTS[2]
    v = d.decide(craft.ike(c, VIP, 7, sport=4500, natt=True), 0.0)
    d.decide_reply(craft.ike(VIP, c, 7, 0x70), 0.01, v.rs)  # answered on 500: recorded all the same
    d.decide(craft.ike(c, VIP, 7, 0x70, sport=4500, natt=True), 0.02)
    reply = build_ipv4_udp(VIP, c, 4500, 4500, (0x2000).to_bytes(4, "big") + bytes(12))
    assert d.decide_reply(reply, 0.1, v.rs).action == Action.FORWARD
    elsewhere = build_ipv4_udp(VIP, c, 4500, 4501, (0x2000).to_bytes(4, "big") + bytes(12))
    assert d.decide_reply(elsewhere, 0.1, v.rs).reason == DropReason.RETURN_NO_CONVERSATION


def test_no_conversation_and_not_ipsec_are_dropped_and_counted():
    d = director()
    c = CLIENTS[3]
    assert d.decide_reply(craft.esp(VIP, c, 0x3000), 0.0, 0).reason == DropReason.RETURN_NO_CONVERSATION
    assert d.decide_reply(craft.ike(VIP, c, 9, 0x90), 0.0, 0).reason == DropReason.RETURN_NO_CONVERSATION
    connect(d, c, 9, 0x90)
    ping = build_ipv4(VIP, c, 1, b"\x08\x00\xf7\xff" + bytes(4))
    dns = build_ipv4_udp(VIP, c, 53, 53, bytes(12))
    for pkt in (ping, dns):
        v = d.decide_reply(pkt, 0.1, d.table.rs_of(d.table.lookup(1, c, 9)))
        assert (v.action, v.reason) == (Action.DROP, DropReason.RETURN_NOT_IPSEC)
    assert d.drops[DropReason.RETURN_NO_CONVERSATION] == 2 and d.drops[DropReason.RETURN_NOT_IPSEC] == 2


def test_a_rekeyed_ike_sa_of_the_client_passes_from_its_server():
    """A server-initiated IKE SA rekey: the new SA's SPIs are unknown until the client speaks on it;
    the server's messages pass when the client's newest entry is on that server."""
    d = director()
    c = CLIENTS[4]
    rs = connect(d, c, 11, 0x11)
    new_sa = craft.ike(VIP, c, 0xABC, 0xDEF)
    assert d.decide_reply(new_sa, 1.0, rs).action == Action.FORWARD
    assert d.decide_reply(new_sa, 1.0, (rs + 1) % 3).reason == DropReason.RETURN_WRONG_SERVER


def test_answered_marks_the_passive_health_signal():
    """A conversation the server answered is not rescheduled as stuck by the client's retransmits."""
    d = director()
    c = CLIENTS[5]
    v = d.decide(craft.ike(c, VIP, 13), 0.0)
    answer(d, c, 13, 0x13, v.rs)
    for i in range(5):
        again = d.decide(craft.ike(c, VIP, 13), 0.1 * (i + 1))
        assert again.rs == v.rs
    assert d.stats["rescheduled_stuck"] == 0
    c2 = CLIENTS[6]
    w = d.decide(craft.ike(c2, VIP, 14), 0.0)
    moved = [d.decide(craft.ike(c2, VIP, 14), 0.1 * (i + 1)).rs for i in range(5)]
    assert d.stats["rescheduled_stuck"] >= 1 and moved[-1] != w.rs


def test_nat_replies_and_other_vips_are_not_judged_by_the_return_path():
    d = director("direct")
    c = CLIENTS[7]
    connect_direct = d.decide(craft.ike(c, VIP, 15), 0.0)
    assert connect_direct.action == Action.FORWARD
    v = d.decide_reply(craft.esp(VIP, c, 0x4000), 0.0, NO_RS)  # the VIP of a "direct" service: not ours
    assert v.action == Action.PASS


@pytest.mark.parametrize("trial", range(20))
def test_unanswered_init_entries_are_reclaimed_first(trial):
    """A full table of INIT entries, half of them answered: 24 new conversations reclaim 24
    unanswered ones and no answered one. The random sample of drop-entry misses every unanswered
    entry once in 256 reclaims; the walk of the INIT list then finds one (20 trials of 24 reclaims:
    without the walk about 85% of such runs lose an answered entry somewhere)."""
    d = director(capacity=64)
    t = d.table
    answered = set()
    for i in range(64):
        c = ip_to_int(f"10.9.{i // 250}.{i % 250 + 1}")
        v = d.decide(craft.ike(c, VIP, 1000 + i), 0.0)
        assert v.action == Action.FORWARD
        if i % 2:
            answer(d, c, 1000 + i, 0x5000 + i, v.rs)
            answered.add(c)
    for i in range(24):
        c = ip_to_int(f"10.8.0.{i + 1}")
        assert d.decide(craft.ike(c, VIP, 2000 + i), 1.0).action == Action.FORWARD
    left = {t.conversation(s)[1] for s in t.slots()}
    assert answered <= left, f"{len(answered - left)} answered entries reclaimed before unanswered ones"
    assert t.stats["reclaimed_init"] == 24


def test_return_path_values_are_checked():
    with pytest.raises(ConfigError, match="service.return_path"):
        Service(id=1, vip=VIP, return_path="router")


def test_table_reclaim_without_answers_is_unchanged():
    """No entry answered (DR with the direct return path): drop-entry still takes INIT entries."""
    t = Table(4, now=0.0, seed=1)
    for i in range(4):
        t.create(1, CLIENTS[i], 500, 100 + i, 0, 0.0)
    s = t.create(1, CLIENTS[10], 500, 200, 0, 0.0)
    assert s >= 0 and t.stats["reclaimed_init"] == 1
