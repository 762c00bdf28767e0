"""The table sync carries IPv6 entries: 76-byte records in datagrams flagged FLAG_IPV6, one family
per datagram, a dual-stack table replicated whole by changes and by snapshot."""

import pytest

from director import sync
from director.core import Director
from director.isakmp_state import State, Timeouts
from director.packet import ip_to_int
from director.schedulers import RealServer
from director.service import Service
from director.sync import FLAG_END, FLAG_IPV6, MAX_DATAGRAM, MAX_RECORDS6, Message, MsgType, Outcome, Receiver
from director.sync import RecKind, Record, Sender

KEY = bytes(range(32))
VIP4, VIP6 = ip_to_int("192.0.2.10"), ip_to_int("2001:db8:f::1")
RIPS4 = [ip_to_int(f"198.51.100.{i}") for i in (1, 2)]
RIPS6 = [ip_to_int(f"2001:db8:5::{i}") for i in (1, 2)]
C6 = [ip_to_int(f"2001:db8:c:{i:x}::10") for i in range(1, 60)]
C4 = [ip_to_int(f"203.0.113.{i}") for i in range(1, 60)]


def director(ids4=(0, 1), ids6=(2, 3), svc=(1, 2)) -> Director:
    d = Director(capacity=4096)
    for sid, vip, ids, rips in ((svc[0], VIP4, ids4, RIPS4), (svc[1], VIP6, ids6, RIPS6)):
        d.add_service(Service(id=sid, vip=vip, scheduler_name="rr", timeouts=Timeouts(init=10.0, established=100.0),
                              servers={i: RealServer(id=i, addr=a) for i, a in zip(ids, rips)}))
    return d


def view(d):
    return {(d.services[e.svc].vip, e.client, e.cport, e.spi_i, e.state, d.server(e.rs).addr)
            for e in d.table.entries()}


def test_ipv6_record_round_trip_and_size():
    r = Record(RecKind.ESTABLISH, State.ESTABLISHED, VIP6, C6[0], 4500, RIPS6[1], 0x1122334455667788, 7, 12.5, True)
    m = Message(MsgType.CHANGES, 42, 7, 3, FLAG_IPV6, (r,) * MAX_RECORDS6)
    data = sync.encode(KEY, m)
    assert len(data) == sync.HEADER.size + MAX_RECORDS6 * 76 + sync.MAC_LEN <= MAX_DATAGRAM
    assert sync.decode(data) == m
    with pytest.raises(ValueError, match="one family"):
        sync.encode(KEY, Message(MsgType.CHANGES, 1, 1, 1, 0, (r,)))  # IPv6 records unflagged
    four = Record(RecKind.SNAP, State.INIT, VIP4, C4[0], 500, RIPS4[0], 1)
    with pytest.raises(ValueError, match="one family"):
        sync.encode(KEY, Message(MsgType.CHANGES, 1, 1, 1, FLAG_IPV6, (r, four)))
    with pytest.raises(ValueError, match="at most 17"):
        sync.encode(KEY, Message(MsgType.CHANGES, 1, 1, 1, FLAG_IPV6, (r,) * (MAX_RECORDS6 + 1)))


def test_an_ipv6_record_in_the_ipv4_block_is_malformed():
    r = Record(RecKind.SNAP, State.INIT, VIP6, C6[0], 500, RIPS6[0], 1)
    data = bytearray(sync.encode(KEY, Message(MsgType.CHANGES, 1, 1, 1, FLAG_IPV6, (r,))))
    data[sync.HEADER.size + 4 + 16:sync.HEADER.size + 4 + 32] = bytes(12) + bytes([10, 0, 0, 1])  # the client
    with pytest.raises(sync.SyncError, match="::/96"):
        sync.decode(bytes(data[:-sync.MAC_LEN]) + bytes(sync.MAC_LEN))


def test_a_dual_stack_table_replicates_by_changes_and_by_snapshot():
    a, b = director(), director(ids4=(8, 9), ids6=(6, 5), svc=(4, 3))  # ids differ between directors
    tx = Sender(a, KEY, sender_id=1, epoch=1000)
    tx.attach()
    rx = Receiver(b, KEY, own_id=2)
    for i in range(40):
        s6 = a.table.create(2, C6[i], 500, 0x600 + i, 2 + i % 2, 1.0)
        a.table.establish(s6, 0x6000 + i, 1.0)
        a.table.set_port(s6, 4500)
        a.table.create(1, C4[i], 500, 0x400 + i, i % 2, 1.0)
    dgrams = tx.flush(1.0)
    flags = [sync.decode(g).flags for g in dgrams]
    assert flags.count(FLAG_IPV6) == 3 and flags.count(0) == 2  # 40 IPv6 records 17 at a time, 40 IPv4 33 at a time
    for g in dgrams:
        assert rx.handle(g, 1.0) == Outcome.APPLIED
    assert view(b) == view(a) and len(view(b)) == 80
    s = b.table.established_of_natt(3, C6[5], 4500)[0]
    assert s >= 0 and b.table.view(s).spi_r == 0x6005
    # a fresh backup gets both families from one snapshot, END on its last datagram only
    c = director(ids4=(11, 12), ids6=(13, 14), svc=(7, 8))
    rx2 = Receiver(c, KEY, own_id=3)
    parts = tx.snapshot(2.0)
    assert [sync.decode(p).flags & FLAG_END for p in parts] == [0] * (len(parts) - 1) + [FLAG_END]
    outcomes = [rx2.handle(p, 2.0) for p in parts]
    assert outcomes[-1] == Outcome.SNAPSHOT_DONE
    assert view(c) == view(a)
