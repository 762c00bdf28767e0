"""SPI labels in the decision core: a conversation this director never saw (it started on another
director) goes to the real server its SPI names, and an entry is made so what follows (more ESP,
rekeys, counters) behaves as if the director had seen the IKE exchange. Crafted bytes only."""

from __future__ import annotations

import pytest

from director import reconcile
from director.config import ConfigErrors, parse
from director.core import RS_CONNS, Action, Director
from director.drop_reasons import DropReason
from director.lab import craft
from director.packet import int_to_ip, ip_to_int

VIP = ip_to_int("192.0.2.10")
RIPS = ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
MASK = 0x00FF000000000000
LABELS = [0x0011000000000000, 0x0022000000000000, 0x0033000000000000]
ESP_RANGES = [(0xC1000000, 0xC1FFFFFF), (0xC2000000, 0xC2FFFFFF), (0xC3000000, 0xC3FFFFFF)]


def config(labels: bool = True, scheduler: str = "rr") -> str:
    text = f'[[service]]\nvip = "192.0.2.10"\nscheduler = "{scheduler}"\n'
    if labels:
        text += f'spi_label = {{ mask = "{MASK:#018x}" }}\n'
    for rip, label, (lo, hi) in zip(RIPS, LABELS, ESP_RANGES):
        text += f'[[service.server]]\naddress = "{rip}"\n'
        if labels:
            text += f'spi_label = "{label:#018x}"\nesp_spi_min = {lo:#x}\nesp_spi_max = {hi:#x}\n'
    return text


def director(labels: bool = True) -> Director:
    d = Director(capacity=1024)
    reconcile.reconcile(d, parse(config(labels)))
    return d


def rip(d: Director, v) -> str:
    return int_to_ip(d.server(v.rs).addr)


def client(i: int) -> int:
    return ip_to_int("203.0.113.0") + i


def test_an_ikev2_conversation_from_another_director_goes_to_its_labelled_server():
    d = director()
    for i in range(3):  # the responder SPI of each server's IKE SA carries its label
        spi_r = LABELS[i] | 0x12345678 | (i << 60)
        v = d.decide(craft.ike(client(i), VIP, 0xA000 + i, spi_r), 1.0)  # IKE_AUTH, Initiator flag set
        assert (v.action, rip(d, v)) == (Action.FORWARD, RIPS[i])
        # the entry exists: its ESP follows, counted on that server
        esp = d.decide(craft.esp(client(i), VIP, 0x9999), 1.1)
        assert (esp.action, rip(d, esp)) == (Action.FORWARD, RIPS[i])
    assert d.stats["label_steered"] == 3 and d.stats["adopted"] == 0 and d.stats["scheduled"] == 0
    assert len(d.table) == 3 and d.table.n_established == 3
    for i in range(3):
        rs = next(r for r in d.services[0].servers.values() if int_to_ip(r.addr) == RIPS[i])
        assert d.rs_counters[rs.id][RS_CONNS] == 1 and rs.active == 1


def test_a_server_started_ikev2_sa_is_named_by_the_initiator_spi():
    d = director()
    # the real server initiated this IKE SA (a rekey from its side): its SPI is the initiator's,
    # and the client's message is a response from the non-initiator (Initiator flag clear)
    v = d.decide(craft.ike(client(1), VIP, LABELS[2] | 0x77, 0x0044000000000001, flags=0x20), 1.0)
    assert rip(d, v) == RIPS[2]


def test_ikev1_reads_both_spis_and_refuses_a_disagreement():
    d = director()
    v = d.decide(craft.ike(client(1), VIP, 0x1234, LABELS[1] | 5, v1=True, exchange=5), 1.0)
    assert rip(d, v) == RIPS[1]
    # both cookies carry different labels: no answer; no entry, no affinity: dropped as today
    v = d.decide(craft.ike(client(2), VIP, LABELS[0] | 1, LABELS[2] | 1, v1=True, exchange=5), 1.0)
    assert (v.action, v.reason) == (Action.DROP, DropReason.UNKNOWN_IKE_SA)
    assert d.stats["label_steered"] == 1


def test_esp_and_esp_in_udp_with_no_entry_follow_the_spi_range():
    d = director()
    for i, (lo, hi) in enumerate(ESP_RANGES):
        v = d.decide(craft.esp(client(10 + i), VIP, lo + 77), 1.0)
        assert (v.action, rip(d, v)) == (Action.FORWARD, RIPS[i])
        v = d.decide(craft.esp_in_udp(client(20 + i), VIP, hi, sport=40000 + i), 1.0)
        assert (v.action, rip(d, v)) == (Action.FORWARD, RIPS[i])
    assert d.stats["label_steered"] == 6 and d.table.n_established == 6
    # an SPI outside every range: the unknown client gets today's answer
    v = d.decide(craft.esp(client(30), VIP, 0xB0000000), 1.0)
    assert (v.action, v.reason) == (Action.ICMP_UNREACH, DropReason.NO_ENTRY)
    # the client's later IKE (a rekey it starts, unlabelled SPIs) follows its entry by affinity
    v = d.decide(craft.ike(client(10), VIP, 0x5151, 0x6161), 2.0)
    assert rip(d, v) == RIPS[0]


def test_sixty_conversations_with_no_state_each_reach_the_server_their_spi_names():
    """What a director that joins (or takes over from a dead one) sees: only the middle of
    conversations. 60 clients, 20 per server: every packet reaches its own server."""
    d = director()
    for n in range(60):
        i = n % 3
        c = client(100 + n)
        ike = d.decide(craft.ike(c, VIP, 0xE000 + n, LABELS[i] | (n * 7919 & 0xFFFFFFFF)), 1.0)
        esp = d.decide(craft.esp(c, VIP, ESP_RANGES[i][0] + n), 1.0)
        assert rip(d, ike) == rip(d, esp) == RIPS[i], n
    by_server = {r: 0 for r in RIPS}
    for e in d.table.entries():
        by_server[int_to_ip(d.server(e.rs).addr)] += 1
    assert by_server == {r: 20 for r in RIPS}


def test_without_labels_nothing_changes():
    d = director(labels=False)
    v = d.decide(craft.ike(client(1), VIP, 0x1234, LABELS[1] | 5), 1.0)
    assert (v.action, v.reason) == (Action.DROP, DropReason.UNKNOWN_IKE_SA)
    v = d.decide(craft.esp(client(1), VIP, ESP_RANGES[1][0]), 1.0)
    assert (v.action, v.reason) == (Action.ICMP_UNREACH, DropReason.NO_ENTRY)
    assert d.stats["label_steered"] == 0 and len(d.table) == 0


def test_a_removed_server_and_a_reload_rebuild_the_labels():
    d = director()
    cfg = parse(config())
    # drop the third server: its label names nobody now
    text = config().rsplit("[[service.server]]", 1)[0]
    reconcile.reconcile(d, parse(text))
    v = d.decide(craft.ike(client(1), VIP, 0x1234, LABELS[2] | 5), 1.0)
    assert (v.action, v.reason) == (Action.DROP, DropReason.UNKNOWN_IKE_SA)
    reconcile.reconcile(d, cfg)  # back, with a new server id: the label follows it
    v = d.decide(craft.ike(client(1), VIP, 0x1234, LABELS[2] | 5), 1.0)
    assert rip(d, v) == RIPS[2]


@pytest.mark.parametrize("change, error", [
    (lambda t: t.replace('mask = "0x00ff000000000000"', 'mask = "0x00ff0000000000ff"'),
     "service[0].spi_label.mask: must be one run of contiguous bits"),
    (lambda t: t.replace('"0x0022000000000000"', '"0x0011000000000000"'),
     "service[0].server[1].spi_label: 0x11000000000000 is already real server 0's"),
    (lambda t: t.replace('"0x0033000000000000"', '"0x0033000000000001"'),
     "service[0].server[2].spi_label: 0x33000000000001 has bits outside the mask"),
    (lambda t: t.replace("esp_spi_min = 0xc2000000", "esp_spi_min = 0xc1000010"),
     "service[0].server[1]: ESP range overlaps real server 0's"),
    (lambda t: t.replace("esp_spi_max = 0xc3ffffff\n", ""),
     "service[0].server[2]: esp_spi_min and esp_spi_max go together"),
    (lambda t: t.replace('spi_label = "0x0022000000000000"\n', ""),
     "service[0].server[1].spi_label: missing: with spi_label.mask set"),
    (lambda t: t.replace('spi_label = "0x0022000000000000"', 'spi_label = 22'),
     "service[0].server[1].spi_label: must be a hex string"),
    (lambda t: t.replace('spi_label = { mask = "0x00ff000000000000" }\n', ""),
     "service[0].server[0].spi_label: the service has no spi_label.mask"),
])
def test_bad_labels_are_named_by_field(change, error):
    with pytest.raises(ConfigErrors) as e:
        parse(change(config()))
    assert any(line.startswith(error) for line in e.value.errors), e.value.errors


# -- the eBPF fast path forwarded labelled ESP; the daemon drains its records (label_forwarded) -------


def test_a_kernel_forwarded_labelled_client_gets_its_established_entry_and_map_keys():
    d = director()
    proj = d.client_projection()
    lo, _hi = ESP_RANGES[1]
    rs = d.label_forwarded(VIP, client(1), 0, lo + 5, 1.0)  # raw ESP: port 0
    natt_rs = d.label_forwarded(VIP, client(2), 40000, ESP_RANGES[2][1], 1.0)  # ESP-in-UDP from 40000
    assert (int_to_ip(d.server(rs).addr), int_to_ip(d.server(natt_rs).addr)) == (RIPS[1], RIPS[2])
    assert d.stats["label_steered"] == 2 and d.table.n_established == 2
    keys = {(c, port): r for _vip, c, port, r in proj.drain()}
    assert keys[(client(1), 0)] == rs and keys[(client(2), 40000)] == natt_rs  # written to `clients` next
    # the same records again (the kernel forwarded more before the map had the key): nothing new
    assert d.label_forwarded(VIP, client(1), 0, lo + 6, 1.2) is None
    assert d.label_forwarded(VIP, client(2), 40000, ESP_RANGES[2][1], 1.2) is None
    assert d.stats["label_steered"] == 2 and len(d.table) == 2
    # what follows through the slow path uses the entry, as for a conversation seen from the start
    v = d.decide(craft.esp_in_udp(client(2), VIP, 0x1234, sport=40000), 2.0)
    assert (v.action, rip(d, v)) == (Action.FORWARD, RIPS[2])


def test_label_forwarded_refuses_what_the_slow_path_would():
    d = Director(capacity=1024, new_per_source=1.0)
    reconcile.reconcile(d, parse(config()))
    assert d.label_forwarded(VIP, client(1), 0, 0xB0000000, 1.0) == DropReason.NO_ENTRY  # in no range
    assert d.label_forwarded(ip_to_int("192.0.2.99"), client(1), 0, ESP_RANGES[0][0], 1.0) is None  # no service
    assert isinstance(d.label_forwarded(VIP, client(2), 0, ESP_RANGES[0][0], 1.0), int)
    # a second new conversation of the same source in the same second: the per-source limit
    assert d.label_forwarded(VIP, client(2), 40001, ESP_RANGES[0][0], 1.1) == DropReason.SOURCE_RATE_LIMITED
    assert d.stats["label_steered"] == 1 and len(d.table) == 1
    assert director(labels=False).label_forwarded(VIP, client(1), 0, ESP_RANGES[0][0], 1.0) is None


def test_label_forwarded_leaves_an_ike_exchange_in_progress_alone():
    d = director()
    d.decide(craft.ike(client(3), VIP, 0x4242, sport=4500, natt=True), 1.0)  # IKE_SA_INIT on 4500: INIT entry
    assert d.label_forwarded(VIP, client(3), 4500, ESP_RANGES[0][0], 1.1) is None
    assert d.table.n_established == 0 and d.stats["label_steered"] == 0
