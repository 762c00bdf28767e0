"""The failover sync protocol (director/sync.py): framing, MAC, replay window, snapshot, apply."""

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from director import sync
from director.core import Director
from director.isakmp_state import State, Timeouts
from director.packet import ip_to_int
from director.schedulers import RealServer
from director.service import Service
from director.sync import (MAX_DATAGRAM, MAX_RECORDS, Message, MsgType, Outcome, Receiver, RecKind,
                           Record, ReplayWindow, Sender)

KEY = bytes(range(32))
VIP = ip_to_int("192.0.2.10")
RIPS = [ip_to_int(f"198.51.100.{i}") for i in (1, 2, 3)]
CLIENTS = [ip_to_int(f"203.0.113.{i}") for i in range(1, 40)]


def director(rs_ids=(0, 1, 2), rips=RIPS, svc_id=1, capacity=4096):
    """Backup directors number their services and servers differently: ids must not matter."""
    d = Director(capacity=capacity)
    servers = {i: RealServer(id=i, addr=a) for i, a in zip(rs_ids, rips)}
    d.add_service(Service(id=svc_id, vip=VIP, scheduler_name="rr",
                          timeouts=Timeouts(init=10.0, established=100.0), servers=servers))
    return d


def pair():
    active, backup = director(), director(rs_ids=(7, 5, 9), svc_id=4)
    tx = Sender(active, KEY, sender_id=1, epoch=1000)
    tx.attach()
    return active, backup, tx, Receiver(backup, KEY, own_id=2)


def view(d):
    """(vip, client, port, spi_i, state, rs address) of every entry: what must agree."""
    return {(d.services[e.svc].vip, e.client, e.cport, e.spi_i, e.state, d.server(e.rs).addr)
            for e in d.table.entries()}


def test_pure():
    src = Path(sync.__file__).read_text()
    names = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import)}
    names |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert not names & {"socket", "os", "select", "time", "subprocess", "pyroute2"}


def test_record_and_message_round_trip():
    r = Record(RecKind.ESTABLISH, State.ESTABLISHED, VIP, CLIENTS[0], 4500, RIPS[1], 0x1122334455667788,
               0x99AABBCCDDEEFF00, 12.5, natt=True)
    m = Message(MsgType.CHANGES, 42, 7, 3, 0, (r,) * 2)
    data = sync.encode(KEY, m)
    assert len(data) == sync.HEADER.size + 2 * sync.RECORD.size + sync.MAC_LEN
    assert sync.authenticate(KEY, data)
    assert sync.decode(data) == m


def test_full_datagram_fits_and_too_many_records_refused():
    r = Record(RecKind.SNAP, State.INIT, VIP, 1, 500, RIPS[0], 1)
    assert len(sync.encode(KEY, Message(MsgType.SNAPSHOT, 1, 1, 1, 0, (r,) * MAX_RECORDS))) <= MAX_DATAGRAM
    with pytest.raises(ValueError):
        sync.encode(KEY, Message(MsgType.SNAPSHOT, 1, 1, 1, 0, (r,) * (MAX_RECORDS + 1)))


@pytest.mark.parametrize("text, ok", [
    ("00" * 16, True), ("AAECAwQFBgcICQoLDA0ODxAREhM=", True), ("00" * 8, False), ("not a key!", False), ("", False),
])
def test_parse_key(text, ok):
    if ok:
        assert len(sync.parse_key(text)) >= 16
    else:
        with pytest.raises(ValueError):
            sync.parse_key(text)


def test_changes_replicate_create_establish_port_remove():
    a, b, tx, rx = pair()
    t = a.table
    s = t.create(1, CLIENTS[0], 500, 0xA1, 0, 1.0)
    for dgram in tx.flush(1.0):
        assert rx.handle(dgram, 1.0) == Outcome.APPLIED
    assert view(b) == {(VIP, CLIENTS[0], 500, 0xA1, State.INIT, RIPS[0])}
    t.establish(s, 0xB1, 2.0)
    t.set_port(s, 4500)
    for dgram in tx.flush(2.0):
        rx.handle(dgram, 2.0)
    assert view(b) == {(VIP, CLIENTS[0], 4500, 0xA1, State.ESTABLISHED, RIPS[0])}
    bs = b.table.lookup(4, CLIENTS[0], 0xA1)
    assert b.table.view(bs).spi_r == 0xB1
    assert b.table.established_of_natt(4, CLIENTS[0], 4500)[0] == bs  # ESP-in-UDP finds it
    assert 95 < b.table.view(bs).expires - 2.0 <= 100  # the active's remaining timeout
    assert b.server(7).active == 1  # scheduler counts follow
    t.remove(s)
    for dgram in tx.flush(3.0):
        rx.handle(dgram, 3.0)
    assert view(b) == set() and b.server(7).active == 0
    assert rx.stats["rejected_mac"] == rx.stats["rejected_replay"] == rx.stats["ignored"] == 0


def test_established_entry_created_directly():
    a, b, tx, rx = pair()
    s = a.table.create(1, CLIENTS[1], 500, 0xA2, 2, 0.0)
    a.table.establish(s, 0xB2, 0.0)
    for dgram in tx.flush(0.0):
        rx.handle(dgram, 0.0)
    assert view(b) == {(VIP, CLIENTS[1], 500, 0xA2, State.ESTABLISHED, RIPS[2])}


def test_backup_marks_its_fast_path_projection():
    a, b, tx, rx = pair()
    p = b.client_projection()
    s = a.table.create(1, CLIENTS[2], 4500, 0xA3, 1, 0.0)
    a.table.establish(s, 0xB3, 0.0)
    for dgram in tx.flush(0.0):
        rx.handle(dgram, 0.0)
    assert (4, CLIENTS[2], 4500) in p.pending
    p.pending.clear()
    a.table.remove(s)
    for dgram in tx.flush(1.0):
        rx.handle(dgram, 1.0)
    assert (4, CLIENTS[2], 4500) in p.pending


def test_forged_message_rejected_and_counted():
    a, b, tx, rx = pair()
    a.table.create(1, CLIENTS[0], 500, 0xA1, 0, 0.0)
    (dgram,) = tx.flush(0.0)
    bad = bytearray(dgram)
    bad[sync.HEADER.size + 8] ^= 0xFF  # the client address, under the MAC
    assert rx.handle(bytes(bad), 0.0) == Outcome.REJECTED
    other = Receiver(b, b"\x01" * 32)
    assert other.handle(dgram, 0.0) == Outcome.REJECTED  # wrong key
    assert rx.handle(b"garbage", 0.0) == Outcome.REJECTED
    assert rx.stats["rejected_mac"] == 2 and other.stats["rejected_mac"] == 1
    assert view(b) == set()
    assert rx.handle(dgram, 0.0) == Outcome.APPLIED  # the forgery did not move the window


def test_replay_rejected_and_counted():
    a, b, tx, rx = pair()
    a.table.create(1, CLIENTS[0], 500, 0xA1, 0, 0.0)
    (dgram,) = tx.flush(0.0)
    assert rx.handle(dgram, 0.0) == Outcome.APPLIED
    a.table.remove(a.table.lookup(1, CLIENTS[0], 0xA1))
    (removal,) = tx.flush(0.0)
    assert rx.handle(removal, 0.0) == Outcome.APPLIED
    assert rx.handle(dgram, 0.0) == Outcome.REJECTED  # the old create, replayed: no resurrection
    assert rx.stats["rejected_replay"] == 1 and view(b) == set()


def test_out_of_order_within_window_accepted():
    w = ReplayWindow()
    assert w.check(5, 10)
    assert w.check(5, 8) and w.check(5, 9) and w.check(5, 12) and w.check(5, 11)
    assert not w.check(5, 9)  # repeat
    assert w.check(5, 100)
    assert not w.check(5, 100 - sync.WINDOW)  # fell off the window
    assert w.check(5, 100 - sync.WINDOW + 1)
    assert not w.check(4, 1000)  # an older epoch
    assert w.check(6, 1)  # a new epoch resets the window


def test_snapshot_rebuilds_and_removes_stale_entries():
    a, b, tx, rx = pair()
    for i in range(80):  # more than two datagrams' worth
        s = a.table.create(1, CLIENTS[i % 39], 500 + i, 0x1000 + i, i % 3, 0.0)
        if i % 2:
            a.table.establish(s, 0x2000 + i, 0.0)
    tx.clear()  # the backup was away: it missed all of that
    stale = b.table.create(4, CLIENTS[0], 500, 0xDEAD, 5, 0.0)  # e.g. adopted from an old eBPF map
    b.table.establish(stale, 1, 0.0)
    parts = tx.snapshot(1.0)
    assert len(parts) == 3 and all(len(p) <= MAX_DATAGRAM for p in parts)
    outcomes = [rx.handle(p, 1.0) for p in parts[::-1]]  # any order
    assert outcomes[-1] == Outcome.SNAPSHOT_DONE
    assert view(b) == view(a) and len(view(b)) == 80
    assert rx.stats["snapshots"] == 1
    # the snapshot opened a new epoch: everything older is a replay now
    a.table.create(1, CLIENTS[5], 600, 0x3000, 0, 2.0)
    tx.epoch -= 1
    tx.seq = 100
    for dgram in tx.flush(2.0):
        assert rx.handle(dgram, 2.0) == Outcome.REJECTED


def test_request_answered_by_snapshot():
    a, b, tx, rx = pair()
    backup_tx = Sender(b, KEY, sender_id=2, epoch=5)
    active_rx = Receiver(a, KEY, own_id=1)
    req = backup_tx.request()
    assert active_rx.handle(req, 0.0) == Outcome.REQUEST
    assert active_rx.handle(req, 0.0) == Outcome.REJECTED  # a replayed request costs no snapshot


def test_unknown_service_or_server_ignored_and_counted():
    a, b, tx, rx = pair()
    b2 = director(rs_ids=(3, 4), rips=RIPS[:2], svc_id=4)  # the backup lacks the third server
    rx2 = Receiver(b2, KEY)
    s = a.table.create(1, CLIENTS[0], 500, 0xA1, 2, 0.0)
    a.table.establish(s, 1, 0.0)
    r = Record(RecKind.CREATE, State.INIT, ip_to_int("192.0.2.99"), CLIENTS[1], 500, RIPS[0], 0xA2)
    data = tx.flush(0.0) + [sync.encode(KEY, Message(MsgType.CHANGES, 1, 9999, 1, 0, (r,)))]
    for dgram in data:
        rx2.handle(dgram, 0.0)
    assert view(b2) == set() and rx2.stats["ignored"] == 2


def test_backup_sender_disabled_collects_nothing():
    a, b, tx, rx = pair()
    btx = Sender(b, KEY, sender_id=2, epoch=1)
    btx.attach()
    btx.enabled = False
    a.table.create(1, CLIENTS[0], 500, 0xA1, 0, 0.0)
    for dgram in tx.flush(0.0):
        rx.handle(dgram, 0.0)
    assert len(b.table) == 1 and btx.pending == 0


# -- the stream of an active director's changes, applied to an empty backup -------------------------

OPS = st.lists(st.tuples(st.sampled_from(["create", "establish", "port", "remove", "expire", "flush"]),
                         st.integers(0, 38), st.integers(0, 5), st.integers(0, 2)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_stream_replicates_the_table(ops):
    a, b, tx, rx = pair()
    t = a.table
    now = 0.0
    for op, ci, cookie, rs in ops:
        now += 0.5
        client, spi = CLIENTS[ci], 0x100 + cookie
        s = t.lookup(1, client, spi)
        if op == "create" and s < 0:
            t.create(1, client, 500, spi, rs, now)
        elif op == "establish" and s >= 0:
            t.establish(s, 0xBEEF + cookie, now)
        elif op == "port" and s >= 0:
            t.set_port(s, 4500 + rs)
        elif op == "remove" and s >= 0:
            t.remove(s)
        elif op == "expire":
            a.expire(now + 10 * rs)  # INIT entries (10 s) go; established ones (100 s) stay
        elif op == "flush":
            for dgram in tx.flush(now):
                assert rx.handle(dgram, now) == Outcome.APPLIED
    for dgram in tx.flush(now):
        rx.handle(dgram, now)
    assert view(b) == view(a)
    assert rx.stats["ignored"] == 0


def test_the_sender_is_one_table_listener_among_others_and_detaches():
    a, b, tx, rx = pair()
    p = a.client_projection()  # the fast path's listener beside the sender's
    s = a.table.create(1, CLIENTS[3], 500, 0xA4, 0, 0.0)
    a.table.establish(s, 0xB4, 0.0)
    assert tx.pending == 1 and p.pending == {(1, CLIENTS[3], 500)}
    assert a.server(0).active == 1  # the director's own counts still follow the table
    tx.detach()
    a.table.create(1, CLIENTS[4], 500, 0xA5, 1, 0.0)
    assert tx.pending == 1  # detached: the new entry is not collected
    for dgram in tx.flush(0.0):
        rx.handle(dgram, 0.0)
    assert view(b) == {(VIP, CLIENTS[3], 500, 0xA4, State.ESTABLISHED, RIPS[0])}
