"""The failover sync protocol (director/sync.py): framing, MAC, replay window, snapshot, apply."""

import ast
import struct
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


# -- golden vectors: the wire format, byte for byte (a change of format must change these) --------
GOLDEN_KEY = bytes(range(32))
GOLDEN_RECORDS = {
    "r1": Record(RecKind.ESTABLISH, State.ESTABLISHED, VIP, ip_to_int("203.0.113.7"), 4500, ip_to_int("198.51.100.2"),
                 0x0102030405060708, 0x1112131415161718, 12.5, natt=True),
    "r2": Record(RecKind.EXPIRE, State.INIT, VIP, ip_to_int("203.0.113.8"), 500, ip_to_int("198.51.100.3"),
                 0xA1A2A3A4A5A6A7A8),
    "r3": Record(RecKind.SNAP, State.INIT, VIP, ip_to_int("203.0.113.9"), 500, ip_to_int("198.51.100.1"),
                 0xB1B2B3B4B5B6B7B8, 0, 9.75),
}
GOLDEN = [
    (Message(MsgType.CHANGES, ip_to_int("198.51.100.21"), 1733356800000000, 5, 0,
             (GOLDEN_RECORDS["r1"], GOLDEN_RECORDS["r2"])),
     # header: "VS", version 1, type 1, sender 198.51.100.21, epoch, sequence 5, flags 0, 2 records, pad
     "5653" "01" "01" "c6336415" "0006287a94554000" "0000000000000005" "00" "02" "0000"
     # r1: ESTABLISH, ESTABLISHED, NAT-T, pad, VIP, client, port 4500, pad, server, SPIs, 12500 ms
     "02" "02" "01" "00" "c000020a" "cb007107" "1194" "0000" "c6336402" "0102030405060708" "1112131415161718"
     "000030d4"
     # r2: EXPIRE, INIT, no flags, pad, VIP, client, port 500, pad, server, SPI, no responder SPI, 0 ms
     "05" "01" "00" "00" "c000020a" "cb007108" "01f4" "0000" "c6336403" "a1a2a3a4a5a6a7a8" "0000000000000000"
     "00000000"
     # HMAC-SHA256 over all of the above
     "7fa2d0c506ab5d10b8658441b59b9d75ff82d990ce2a93563c1f7b5ab5a46dd6"),
    (Message(MsgType.SNAPSHOT, ip_to_int("198.51.100.21"), 1733356800000001, 2, sync.FLAG_END,
             (GOLDEN_RECORDS["r3"],)),
     "5653" "01" "02" "c6336415" "0006287a94554001" "0000000000000002" "01" "01" "0000"
     "06" "01" "00" "00" "c000020a" "cb007109" "01f4" "0000" "c6336401" "b1b2b3b4b5b6b7b8" "0000000000000000"
     "00002616"
     "c5d5dc9790b7d24aa732cd01e2228b2c41fdf5db721007d4a2eae402d6f1e282"),
    (Message(MsgType.REQUEST, ip_to_int("198.51.100.22"), 1733356800000002, 1),
     "5653" "01" "03" "c6336416" "0006287a94554002" "0000000000000001" "00" "00" "0000"
     "413113a495ffccfc570122433df123fd4a7140fcb7a440a531d5fdecda710d58"),
]


@pytest.mark.parametrize("msg, hexbytes", GOLDEN, ids=["changes", "snapshot-part", "request"])
def test_golden_vectors_both_ways(msg, hexbytes):
    wire = bytes.fromhex(hexbytes)
    assert sync.encode(GOLDEN_KEY, msg) == wire  # pack -> the committed bytes
    assert sync.authenticate(GOLDEN_KEY, wire)
    assert sync.decode(wire) == msg  # the committed bytes -> parse
    assert not sync.authenticate(bytes(32), wire)  # the MAC depends on the key


# -- replay across a receiver restart ------------------------------------------------------------
def test_restarted_receiver_refuses_a_captured_datagram():
    active, backup, tx, rx = pair()
    persisted: dict[int, int] = {}
    rx = Receiver(backup, KEY, own_id=2, on_epoch=lambda s, e: persisted.__setitem__(s, e))
    active.table.create(1, CLIENTS[0], 500, 0xAA, 0, 0.0)
    captured = tx.flush(0.0)
    assert len(captured) == 1 and rx.handle(captured[0], 1.0) == Outcome.APPLIED
    assert persisted == {1: 1000}
    # without persisted floors a restarted receiver accepts the capture again (the defect)
    assert Receiver(director(), KEY, own_id=2).handle(captured[0], 2.0) == Outcome.APPLIED
    # with them, the capture is refused (counted), and the sender's next snapshot epoch is accepted
    again = Receiver(director(), KEY, own_id=2, floors=persisted)
    assert again.handle(captured[0], 2.0) == Outcome.STALE  # refused (the link asks the sender for a snapshot)
    assert again.stats["rejected_replay"] == 1 and again.stats["applied"] == 0
    active.table.create(1, CLIENTS[1], 500, 0xBB, 1, 0.0)
    assert again.handle(tx.flush(3.0)[0], 3.0) == Outcome.STALE  # same epoch: its window is gone
    parts = tx.snapshot(4.0, 2000)
    assert [again.handle(p, 4.0) for p in parts][-1] == Outcome.SNAPSHOT_DONE
    assert view(again.d) == view(active)


def test_floor_closes_its_epoch_and_older_ones():
    w = ReplayWindow(floor=50)
    assert not w.check(50, 1) and not w.check(50, 2**64 - 1) and not w.check(49, 10)
    assert w.check(51, 1) and w.check(51, 2) and not w.check(51, 1)


# -- a sender whose clock steps back -------------------------------------------------------------
def test_sender_epochs_climb_when_the_clock_steps_back(tmp_path, monkeypatch):
    from director.dataplane import sync_link

    path = str(tmp_path / "state.json")
    clock = [5_000_000_000_000]  # ns
    monkeypatch.setattr(sync_link.time, "time_ns", lambda: clock[0])
    st = sync_link.SyncState(path)
    first = st.next_epoch()
    assert first == 5_000_000_000
    clock[0] -= 3600 * 10**9  # the clock steps back an hour; the daemon restarts
    st2 = sync_link.SyncState(path)
    second = st2.next_epoch()
    assert second == first + 1
    # the receiver that saw `first` (and persisted it as a floor) accepts the new epoch
    rx = Receiver(director(), KEY, own_id=2, floors={1: first})
    tx = Sender(director(), KEY, 1, epoch=second)
    assert rx.handle(tx.request(), 0.0) == Outcome.REQUEST


def test_state_file_round_trip_and_atomic(tmp_path):
    from director.dataplane import sync_link

    path = tmp_path / "sub" / "state.json"
    st = sync_link.SyncState(str(path))
    st.accepted(7, 100)
    st.accepted(7, 90)  # older: no write, no change
    assert st.writes == 1 and sync_link.SyncState(str(path)).floors == {7: 100}
    assert not (tmp_path / "sub" / "state.json.tmp").exists()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="daemon.sync.state_file"):
        sync_link.SyncState(str(path))


# -- the kernel source filter (its program; tests/integration/test_sync_peers.py runs it) ---------
def test_source_filter_program():
    from director.dataplane.sync_link import source_filter

    peers = [ip_to_int("198.51.100.2"), ip_to_int("198.51.100.3")]
    prog = source_filter(peers)
    ins = [struct.unpack_from("HBBI", prog, i) for i in range(0, len(prog), 8)]
    assert ins[0] == (0x20, 0, 0, (-0x100000 + 12) & 0xFFFFFFFF)  # the IPv4 source word
    assert ins[1] == (0x15, 2, 0, peers[0]) and ins[2] == (0x15, 1, 0, peers[1])  # both jump to accept
    assert ins[3] == (0x06, 0, 0, 0) and ins[4] == (0x06, 0, 0, 0xFFFFFFFF)
    with pytest.raises(ValueError):
        source_filter([])


# -- role all: N peers -----------------------------------------------------------------------------
def trio():
    """Three directors, numbered differently, each with a merging receiver and an enabled sender."""
    ds = [director(), director(rs_ids=(7, 5, 9), svc_id=4), director(rs_ids=(3, 2, 1), svc_id=2)]
    txs = [Sender(d, KEY, sender_id=i + 1, epoch=1000, send_expiry=False) for i, d in enumerate(ds)]
    for t in txs:
        t.attach()
    rxs = [Receiver(d, KEY, own_id=i + 1, merge=True) for i, d in enumerate(ds)]
    return ds, txs, rxs


def deliver(frm, ds, txs, rxs, now):
    """frm's pending changes to every other director, their senders muted while applying (the link)."""
    out = txs[frm].flush(now)
    for i in range(len(ds)):
        if i != frm:
            txs[i].enabled = False
            for dg in out:
                rxs[i].handle(dg, now, peer=f"p{frm}")
            txs[i].enabled = True
    return out


def test_all_replicates_to_every_peer_without_echo():
    ds, txs, rxs = trio()
    ds[0].table.create(1, CLIENTS[0], 500, 0xAA, 0, 0.0)
    assert len(deliver(0, ds, txs, rxs, 0.0)) == 1
    assert view(ds[1]) == view(ds[2]) == view(ds[0]) and len(view(ds[0])) == 1
    assert txs[1].pending == txs[2].pending == 0  # what they learned is not sent on
    assert rxs[1].peers["p0"]["accepted"] == 1 and rxs[1].peers["p0"]["last"] == 0.0


def test_all_does_not_send_local_expiry():
    ds, txs, rxs = trio()
    ds[0].table.create(1, CLIENTS[0], 500, 0xAA, 0, 0.0)
    deliver(0, ds, txs, rxs, 0.0)
    ds[1].expire(1000.0)  # idle on director 2 (its packets went to director 1)
    assert len(ds[1].table) == 0 and txs[1].pending == 0
    assert len(ds[0].table) == 1


def test_all_conflicts_converge_whatever_the_order():
    """Two directors scheduled one conversation on different servers: both converge on the same
    one; an ESTABLISHED record beats an INIT entry, and is never downgraded by an INIT record."""
    for order in ((0, 1), (1, 0)):
        ds, txs, rxs = trio()
        ds[0].table.create(1, CLIENTS[0], 500, 0xAA, 2, 0.0)  # server RIPS[2]
        ds[1].table.create(4, CLIENTS[0], 500, 0xAA, 7, 0.0)  # server RIPS[0]
        for frm in order:
            deliver(frm, ds, txs, rxs, 0.0)
        assert view(ds[0]) == view(ds[1]) == view(ds[2])
        assert {e[5] for e in view(ds[0])} == {RIPS[0]}  # the lower address, on every director
    # director 3 establishes it (on RIPS[1]): ESTABLISHED beats INIT everywhere
    s2 = ds[2].table.lookup(2, CLIENTS[0], 0xAA)
    ds[2].table.move(s2, 2)  # its id 2 is RIPS[1]
    ds[2].table.establish(s2, 0xBB, 1.0)
    deliver(2, ds, txs, rxs, 1.0)
    assert view(ds[0]) == view(ds[1]) == view(ds[2])
    assert {(e[4], e[5]) for e in view(ds[0])} == {(State.ESTABLISHED, RIPS[1])}
    # a late INIT record for another server does not undo it
    late = sync.encode(KEY, Message(MsgType.CHANGES, 1, 1000, 99, 0, (
        Record(RecKind.CREATE, State.INIT, VIP, CLIENTS[0], 500, RIPS[0], 0xAA),)))
    rxs[1].handle(late, 2.0)
    assert {(e[4], e[5]) for e in view(ds[1])} == {(State.ESTABLISHED, RIPS[1])}
    assert rxs[1].stats["conflicts_kept"] >= 1


def test_all_a_late_record_from_the_port_500_director_does_not_undo_the_nat_t_port():
    """ECMP hashes a client's UDP 500 and 4500 flows to different directors. Director 1 sees the
    IKE_SA_INIT and the client's third message on 500 (CREATE, ESTABLISH with port 500);
    director 2 learns the INIT entry, then sees the client float to 4500 (NAT-T), where its ESP
    will come. Director 1's ESTABLISH record, flushed later, must not move director 2's entry
    back to port 500: its ESP-in-UDP (looked up by client and port 4500) would find nothing."""
    ds, txs, rxs = trio()
    s0 = ds[0].table.create(1, CLIENTS[0], 500, 0xAA, 0, 0.0)
    deliver(0, ds, txs, rxs, 0.0)  # CREATE (INIT, 500) everywhere
    ds[0].table.establish(s0, 0xBB, 0.1)  # message 3 on director 1; its flush comes later
    s1 = ds[1].table.lookup(4, CLIENTS[0], 0xAA)
    ds[1].table.establish(s1, 0xBB, 0.2)  # message 5, on 4500, reaches director 2 first
    ds[1].table.set_port(s1, 4500, 0.2)
    ds[1].table.mark_natt(s1)
    deliver(0, ds, txs, rxs, 0.3)  # director 1's ESTABLISH (port 500) arrives late
    assert ds[1].table.port_of(s1) == 4500 and rxs[1].stats["natt_port_kept"] == 1
    assert ds[1].table.established_of_natt(4, CLIENTS[0], 4500)[0] == s1
    deliver(1, ds, txs, rxs, 0.4)  # and director 2's NAT-T port reaches the others
    for d, svc in zip(ds, (1, 4, 2)):
        s = d.table.lookup(svc, CLIENTS[0], 0xAA)
        assert d.table.port_of(s) == 4500 and d.table.established_of_natt(svc, CLIENTS[0], 4500)[0] == s
    # a NAT rebinding seen on NAT-T (a record that is NAT-T too) still moves the port
    late = sync.encode(KEY, Message(MsgType.CHANGES, 1, 1000, 99, 0, (
        Record(RecKind.PORT, State.ESTABLISHED, VIP, CLIENTS[0], 4501, RIPS[0], 0xAA, 0xBB, 100.0, True),)))
    rxs[1].handle(late, 0.5)
    assert ds[1].table.port_of(s1) == 4501


def test_all_snapshot_adds_and_keeps_local_entries():
    ds, txs, rxs = trio()
    ds[0].table.create(1, CLIENTS[0], 500, 0xAA, 0, 0.0)
    ds[2].table.create(2, CLIENTS[1], 500, 0xBB, 3, 0.0)  # director 3's own, not yet known to 1
    parts = txs[0].snapshot(0.0, 2000, keep_pending=True)
    assert txs[0].pending == 1  # the others still get the change
    assert [rxs[2].handle(p, 0.0) for p in parts][-1] == Outcome.SNAPSHOT_DONE
    assert {e[1] for e in view(ds[2])} == {CLIENTS[0], CLIENTS[1]}


def test_config_peers_forms_and_errors():
    from director import config

    base = 'key = "' + "00" * 16 + '"'

    def parse(sync_table):
        return config.parse(f"[daemon.sync]\n{base}\n{sync_table}\n[[service]]\nvip = \"192.0.2.10\"\n"
                            "[[service.server]]\naddress = \"198.51.100.1\"\n")

    one = parse('peer = "198.51.100.2"').daemon.sync
    assert one.peers == ("198.51.100.2",) and one.peer == "198.51.100.2" and one.bind == ""
    assert one.state_file == "/var/lib/vpn-director/sync-state.json"
    many = parse('peers = ["198.51.100.2", "198.51.100.3"]\nrole = "all"\nbind = "198.51.100.1"').daemon.sync
    assert many.peers == ("198.51.100.2", "198.51.100.3") and many.bind == "198.51.100.1"
    assert config.from_dict(config.to_dict(config.Config(daemon=config.DaemonConfig(sync=many)))).daemon.sync == many
    for table, field in [('peer = "198.51.100.2"\npeers = ["198.51.100.3"]', "daemon.sync.peers"),
                         ('peers = ["198.51.100.2", "198.51.100.3"]', "daemon.sync.role"),
                         ('peers = []', "daemon.sync.peers"),
                         ('peers = ["198.51.100.2", "198.51.100.2"]\nrole = "all"', "daemon.sync.peers"),
                         ('peers = ["nope"]\nrole = "all"', "daemon.sync.peers[0]"),
                         ('peer = "198.51.100.2"\nbind = "198.51.100.2"', "daemon.sync.bind"),
                         ('peer = "198.51.100.2"\nstate_file = "relative.json"', "daemon.sync.state_file"),
                         ("", "daemon.sync.peers")]:
        with pytest.raises(config.ConfigErrors) as e:
            parse(table)
        assert [x.split(":")[0] for x in e.value.errors] == [field], (table, e.value.errors)


def test_per_peer_sync_state_in_prometheus():
    """The link's status (per peer: last datagram age, rejected by cause) as metric families."""
    from prometheus_client import CollectorRegistry, generate_latest

    from director.metrics import Collector, Histogram
    from director.views import Views

    rx = Receiver(director(), KEY, own_id=2)
    tx = Sender(director(), KEY, sender_id=1, epoch=1000)
    good = tx.request()
    assert rx.handle(good, 10.0, peer="198.51.100.2") == Outcome.REQUEST
    rx.handle(good, 11.0, peer="198.51.100.2")  # a replay
    rx.handle(b"x" * 80, 12.0, peer="198.51.100.3")  # a forgery

    class Link:
        def status(self):
            rows = [{"peer": p, "last_age": round(13.0 - ps["last"], 3),
                     **{k: v for k, v in ps.items() if k != "last"}} for p, ps in rx.peers.items()]
            return {**rx.stats, "sent": 0, "dropped_kernel": 4, "peers": rows, "conflicts_kept": 5,
                    "conflicts_taken": 6, "natt_port_kept": 7}

    views = Views(director(), clock=lambda: 13.0, latency={"client": Histogram(), "reply": Histogram()},
                  stats={"icmp_sent": 0, "icmp_limited": 0, "icmp_suppressed": 0, "internal_errors": 0,
                         "slow_iterations": 0})
    views.sync = Link()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(views))
    text = generate_latest(reg).decode()
    assert 'director_sync_peer_last_datagram_age_seconds{peer="198.51.100.2"} 2.0' in text
    assert 'director_sync_peer_last_datagram_age_seconds{peer="198.51.100.3"} 1.0' in text
    assert 'director_sync_peer_rejected_total{cause="replay",peer="198.51.100.2"} 1.0' in text
    assert 'director_sync_peer_rejected_total{cause="mac",peer="198.51.100.3"} 1.0' in text
    assert 'director_sync_peer_rejected_total{cause="mac",peer="198.51.100.2"} 0.0' in text
    assert 'director_sync_peer_accepted_total{peer="198.51.100.2"} 1.0' in text
    assert "director_sync_dropped_kernel_total 4.0" in text
    assert "director_sync_conflicts_kept_total 5.0" in text and "director_sync_conflicts_taken_total 6.0" in text
    assert "director_sync_natt_port_kept_total 7.0" in text


def test_closed_epoch_is_reported_stale_so_the_link_asks_that_sender():
    """After a restart, a sender's current epoch is closed: its datagrams are refused as STALE (the
    link then asks that sender for a snapshot); an older epoch is a plain rejection."""
    a = director()
    tx = Sender(a, KEY, sender_id=1, epoch=1000)
    tx.attach()
    rx = Receiver(director(), KEY, own_id=2, floors={1: 1000})
    a.table.create(1, CLIENTS[0], 500, 0xAA, 0, 0.0)
    assert rx.handle(tx.flush(0.0)[0], 0.0) == Outcome.STALE
    old = sync.encode(KEY, Message(MsgType.CHANGES, 1, 999, 1))
    assert rx.handle(old, 0.0) == Outcome.REJECTED
    assert [rx.handle(p, 1.0) for p in tx.snapshot(1.0, 1001)][-1] == Outcome.SNAPSHOT_DONE
    assert rx.stats["rejected_replay"] == 2


def test_vpnadm_list_sync():
    from director.cli import Refused, UsageError, execute, parse

    st = {"role": "all", "synced": True, "bind": "198.18.1.1:8514", "epoch": 7, "sent": 3, "records_sent": 5,
          "snapshots_sent": 1, "received": 9, "applied": 4, "dropped_kernel": 200, "send_errors": 2,
          "peers": [{"peer": "198.18.1.2", "last_age": 0.25, "received": 8, "accepted": 6, "rejected_mac": 1,
                     "rejected_replay": 1, "malformed": 0},
                    {"peer": "198.18.1.3", "last_age": None, "received": 0, "accepted": 0, "rejected_mac": 0,
                     "rejected_replay": 0, "malformed": 0}]}
    out = execute(parse(["-L", "--sync"]), lambda cmd, **kw: {"sync": st})
    lines = out.splitlines()
    assert lines[0] == "Table sync: role all, synced, bind 198.18.1.1:8514, epoch 7"
    assert "dropped by the kernel 200" in lines[1]
    assert lines[3].split() == ["198.18.1.2", "0.2s", "8", "6", "1", "1", "0"]
    assert lines[4].split() == ["198.18.1.3", "never", "0", "0", "0", "0", "0"]
    with pytest.raises(Refused, match="sync: not configured"):
        execute(parse(["-L", "--sync"]), lambda cmd, **kw: {})
    with pytest.raises(UsageError):
        execute(parse(["-L", "--sync", "-V", "192.0.2.10"]), lambda cmd, **kw: {"sync": st})
    with pytest.raises(UsageError):
        parse(["-L", "--sync", "--stats"])
