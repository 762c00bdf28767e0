"""SPI labels, from the kernel's record to the table's entry: label_seen is written once per client
key by the programs (both hooks) and drained by FastPath.drain_labels into ESTABLISHED entries
through the decision core, whose projection then names the keys for the ``clients`` map.

The programs run through BPF_PROG_TEST_RUN (the ``world`` fixture); the FastPath reads the same
pinned maps the programs write, as the daemon's does.
"""

from __future__ import annotations

import pytest

from director import reconcile
from director.config import parse
from director.core import Director
from director.dataplane import bpf_structs as S
from director.dataplane.ebpf import FastPath
from director.lab import craft
from director.packet import int_to_ip, ip_to_int
from fastpath_cases import NATT_SPORT, VERDICT, VIP_LABEL, eth, key, setup_maps
from bpf_world import TC_ACT_REDIRECT, TOPO as T

RIPS = (T.rip_dr, T.rip_nat, T.rip_tun)  # the core's servers; label byte 0x41 + i, as fastpath_cases.LABELS


def director(**kw) -> Director:
    text = f'[[service]]\nvip = "{int_to_ip(VIP_LABEL)}"\nspi_label = {{ mask = "0x00000000ff000000" }}\n'
    for i, rip in enumerate(RIPS):
        b = 0x41 + i
        text += (f'[[service.server]]\naddress = "{int_to_ip(rip)}"\nspi_label = "{b << 24:#018x}"\n'
                 f"esp_spi_min = {b << 24:#x}\nesp_spi_max = {(b << 24) | 0xFFFFFF:#x}\n")  # fmt: skip
    d = Director(capacity=1024, **kw)
    reconcile.reconcile(d, parse(text))
    return d


def fastpath(world, d: Director) -> FastPath:
    """A FastPath on the world's pinned maps (not started: no attach, no config writes)."""
    fp = FastPath(d, client_ifindex=0, lan_ifindex=0, lan_addr=0, lan_mtu=1500, clients_map=None)
    fp.fd = {name: world.map_fd[name] for name in ("label_seen", "label_stats")}
    fp.ncpus = world.ncpus
    return fp


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_one_record_per_client_key_until_drained(world, hook):
    setup_maps(world)
    a = ip_to_int("203.0.113.71")
    frames = [eth(craft.esp(a, VIP_LABEL, 0x41000001, seq)) for seq in range(1, 6)]
    for f in frames:
        assert world.run(hook, f).retval == VERDICT[hook][TC_ACT_REDIRECT]
    assert world.label_stats() == {"forwarded": 5, "recorded": 1, "unknown": 0}
    assert list(world.label_seen()) == [key(a, 0, VIP_LABEL)]
    # the same client from a NAT-T port is another conversation: another record
    world.run(hook, eth(craft.esp_in_udp(a, VIP_LABEL, 0x42000001, sport=NATT_SPORT)))
    assert set(world.label_seen()) == {key(a, 0, VIP_LABEL), key(a, NATT_SPORT, VIP_LABEL)}
    # once drained (deleted), the client's next packet records it again: a refused entry is retried
    world.L.map_delete(world.map_fd["label_seen"], key(a, 0, VIP_LABEL))
    world.run(hook, frames[0])
    assert world.label_stats()["recorded"] == 3 and key(a, 0, VIP_LABEL) in world.label_seen()


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_drain_makes_the_established_entries_and_empties_the_records(world, hook):
    setup_maps(world)
    clients = [ip_to_int("203.0.113.80") + i for i in range(30)]
    for i, c in enumerate(clients):  # 10 clients per server, half raw ESP, half ESP-in-UDP
        spi = ((0x41 + i % 3) << 24) | i
        ip = craft.esp(c, VIP_LABEL, spi) if i % 2 else craft.esp_in_udp(c, VIP_LABEL, spi, sport=NATT_SPORT)
        assert world.run(hook, eth(ip)).retval == VERDICT[hook][TC_ACT_REDIRECT]
    d = director()
    proj = d.client_projection()
    fp = fastpath(world, d)
    assert fp.drain_labels(now=1.0) == 30
    assert world.label_seen() == {}
    assert fp.stats["label_created"] == 30 and fp.stats["label_recorded"] == 30
    assert fp.stats["label_forwarded"] == 30 and d.stats["label_steered"] == 30
    for i, c in enumerate(clients):
        e = [v for v in d.table.entries() if v.client == c]
        assert len(e) == 1 and e[0].state.name == "ESTABLISHED", i
        assert d.server(e[0].rs).addr == RIPS[i % 3], i
        assert e[0].cport == (0 if i % 2 else NATT_SPORT) and e[0].natt == (i % 2 == 0), i
    keys = {(c, port): rs for _vip, c, port, rs in proj.drain() if rs is not None}
    assert len(keys) == 30 + 15  # each client's raw key, and the NAT-T clients' port keys
    # a second drain with nothing new does nothing
    assert fp.drain_labels(now=1.5) == 0 and fp.stats["label_created"] == 30


def test_drain_is_bounded_per_call_and_admission_limits_entry_creation(world):
    """A spoofed flood of labelled ESP from many sources: each drain handles at most ``limit``
    records, and the core's admission limit (new_entries_rate) caps the entries made; the rest
    is counted as refused (the kernel records those clients again by their next packet)."""
    setup_maps(world)
    n = 300
    for i in range(n):
        world.run("tc", eth(craft.esp(ip_to_int("10.200.0.0") + i, VIP_LABEL, 0x43000000 | i)))
    assert len(world.label_seen()) == n
    d = director(new_rate=50.0)
    fp = fastpath(world, d)
    assert fp.drain_labels(now=5.0, limit=100) == 100
    assert len(world.label_seen()) == n - 100
    assert fp.drain_labels(now=5.0, limit=1000) == n - 100 and world.label_seen() == {}
    made, refused = fp.stats["label_created"], fp.stats["label_refused"]
    assert (made, refused) == (50, n - 50) and len(d.table) == 50  # one second's worth: the bucket's burst
