"""A small ctypes binding over libbpf.so.1 (Debian libbpf1, libbpf 1.1): objects, maps, test runs.

Only what the eBPF dataplane and its tests need: open an object file, size and pin its maps before
load, load it, get program and map fds by name; then the map syscalls on plain fds (update, lookup,
delete, iterate), ``bpf_obj_get``/``bpf_obj_pin`` for pinned objects, ``bpf_prog_test_run_opts``
(BPF_PROG_TEST_RUN) and ``libbpf_num_possible_cpus``. Keys and values are ``bytes``; their layouts
live in :mod:`director.dataplane.bpf_structs`.

Every failure raises :class:`OSError` with the errno and a message that names the libbpf call (and,
for a failed load, the tail of libbpf's log: the verifier's complaint). libbpf 1.x returns
``-errno`` from int-returning calls and NULL with ``errno`` set from pointer-returning ones; both are
handled. Struct layouts (``bpf_test_run_opts``, the head of ``bpf_map_info``) mirror
``/usr/include/bpf/bpf.h`` and ``/usr/include/linux/bpf.h`` of libbpf 1.1, ``sz`` first.
"""

from __future__ import annotations

import collections
import ctypes
import errno as _errno
import logging
import os
import threading
from typing import Iterator, NamedTuple

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BpfObject",
    "MapInfo",
    "TestRun",
    "close_fd",
    "map_delete",
    "map_info",
    "map_items",
    "map_keys",
    "map_lookup",
    "map_next_key",
    "map_update",
    "num_possible_cpus",
    "obj_get",
    "obj_pin",
    "prog_test_run",
]

log = logging.getLogger(__name__)

# bpf_map_update_elem flags (linux/bpf.h)
BPF_ANY = 0  # create or update
BPF_NOEXIST = 1  # create only
BPF_EXIST = 2  # update only
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)

_c_int, _c_uint32, _c_char_p, _c_void_p = ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_void_p


def _fn(name: str, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


class _TestRunOpts(ctypes.Structure):
    """``struct bpf_test_run_opts`` of libbpf 1.1 (bpf.h), field for field; ``sz`` first."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", _c_void_p),
        ("data_out", _c_void_p),
        ("data_size_in", _c_uint32),
        ("data_size_out", _c_uint32),
        ("ctx_in", _c_void_p),
        ("ctx_out", _c_void_p),
        ("ctx_size_in", _c_uint32),
        ("ctx_size_out", _c_uint32),
        ("retval", _c_uint32),
        ("repeat", _c_int),
        ("duration", _c_uint32),
        ("flags", _c_uint32),
        ("cpu", _c_uint32),
        ("batch_size", _c_uint32),
    ]


class _MapInfoHead(ctypes.Structure):
    """The first fields of ``struct bpf_map_info`` (linux/bpf.h); the kernel fills min(len, its size)."""

    _fields_ = [
        ("type", _c_uint32),
        ("id", _c_uint32),
        ("key_size", _c_uint32),
        ("value_size", _c_uint32),
        ("max_entries", _c_uint32),
        ("map_flags", _c_uint32),
        ("name", ctypes.c_char * 16),
    ]


_open_file = _fn("bpf_object__open_file", _c_void_p, _c_char_p, _c_void_p)
_obj_load = _fn("bpf_object__load", _c_int, _c_void_p)
_obj_close = _fn("bpf_object__close", None, _c_void_p)
_find_map = _fn("bpf_object__find_map_by_name", _c_void_p, _c_void_p, _c_char_p)
_find_prog = _fn("bpf_object__find_program_by_name", _c_void_p, _c_void_p, _c_char_p)
_next_map = _fn("bpf_object__next_map", _c_void_p, _c_void_p, _c_void_p)
_next_prog = _fn("bpf_object__next_program", _c_void_p, _c_void_p, _c_void_p)
_map_name = _fn("bpf_map__name", _c_char_p, _c_void_p)
_prog_name = _fn("bpf_program__name", _c_char_p, _c_void_p)
_map_set_max = _fn("bpf_map__set_max_entries", _c_int, _c_void_p, _c_uint32)
_map_set_pin = _fn("bpf_map__set_pin_path", _c_int, _c_void_p, _c_char_p)
_map_fd = _fn("bpf_map__fd", _c_int, _c_void_p)
_prog_fd = _fn("bpf_program__fd", _c_int, _c_void_p)
_update = _fn("bpf_map_update_elem", _c_int, _c_int, _c_void_p, _c_void_p, ctypes.c_uint64)
_lookup = _fn("bpf_map_lookup_elem", _c_int, _c_int, _c_void_p, _c_void_p)
_delete = _fn("bpf_map_delete_elem", _c_int, _c_int, _c_void_p)
_lookup_batch = _fn("bpf_map_lookup_batch", _c_int, _c_int, _c_void_p, _c_void_p, _c_void_p, _c_void_p,
                    ctypes.POINTER(_c_uint32), _c_void_p)
_next_key = _fn("bpf_map_get_next_key", _c_int, _c_int, _c_void_p, _c_void_p)
_obj_get = _fn("bpf_obj_get", _c_int, _c_char_p)
_obj_pin = _fn("bpf_obj_pin", _c_int, _c_int, _c_char_p)
_info_by_fd = _fn("bpf_obj_get_info_by_fd", _c_int, _c_int, _c_void_p, ctypes.POINTER(_c_uint32))
_test_run = _fn("bpf_prog_test_run_opts", _c_int, _c_int, ctypes.POINTER(_TestRunOpts))
_num_cpus = _fn("libbpf_num_possible_cpus", _c_int)

# -- libbpf's log: kept (last lines) so a failed load can say what the verifier said ---------------

# typedef int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *, va_list). On x86-64 va_list
# is an array type and on arm64 a 32-byte struct passed by reference: a pointer either way, which
# vsnprintf takes as is.
_PRINT_FN = ctypes.CFUNCTYPE(_c_int, _c_int, _c_char_p, _c_void_p)
_vsnprintf = _libc.vsnprintf
_vsnprintf.restype = _c_int
_vsnprintf.argtypes = [_c_char_p, ctypes.c_size_t, _c_char_p, _c_void_p]
_LOG_LINES = 400
_log_lock = threading.Lock()
_log_tail: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)
_LEVELS = (logging.WARNING, logging.DEBUG, logging.DEBUG)  # LIBBPF_WARN, _INFO, _DEBUG


def _print(level: int, fmt: bytes, ap: int) -> int:
    buf = ctypes.create_string_buffer(8192)
    n = _vsnprintf(buf, len(buf), fmt, ap)
    text = buf.value.decode(errors="replace").rstrip("\n")
    with _log_lock:
        _log_tail.extend(text.splitlines() or [""])
    # libbpf logs each failed load at WARN level, verifier output included; the error we raise
    # carries it, so only DEBUG here (a daemon would otherwise log the verifier dump twice).
    log.debug("libbpf: %s", text)
    return n


_print_cb = _PRINT_FN(_print)  # module-global: the C side keeps the pointer for the process's life
_lib.libbpf_set_print.restype = _c_void_p
_lib.libbpf_set_print.argtypes = [_PRINT_FN]
_lib.libbpf_set_print(_print_cb)


def _log_clear() -> None:
    with _log_lock:
        _log_tail.clear()


def _log_since() -> str:
    with _log_lock:
        return "\n".join(_log_tail)


# -- errors -----------------------------------------------------------------------------------------


def _raise(call: str, ret: int | None = None, detail: str = "") -> None:
    err = -ret if ret is not None and ret < 0 else ctypes.get_errno() or _errno.EINVAL
    msg = f"{call}: {os.strerror(err)}"
    if detail:
        msg += f"\n{detail}"
    raise OSError(err, msg)


def _check(call: str, ret: int) -> int:
    if ret < 0:
        _raise(call, ret)
    return ret


def _buf(data: bytes | bytearray | memoryview) -> ctypes.Array:
    b = bytes(data)
    return (ctypes.c_char * max(len(b), 1)).from_buffer_copy(b or b"\0")


# -- objects ----------------------------------------------------------------------------------------


class BpfObject:
    """One BPF object file opened with libbpf: configure maps, ``load()``, then take fds by name.

    Use as a context manager or call :meth:`close`. Closing the object closes its fds; pinned maps
    (and pinned programs, attached programs) stay in the kernel.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        """Open ``path`` (``bpf_object__open_file``); nothing is created in the kernel yet."""
        self._obj: int | None = None
        self.path = os.fspath(path)
        ctypes.set_errno(0)
        obj = _open_file(self.path.encode(), None)
        if not obj:
            _raise(f"bpf_object__open_file({self.path})")
        self._obj = obj
        self.loaded = False

    def _handle(self) -> int:
        if self._obj is None:
            raise OSError(_errno.EBADF, f"{self.path}: object already closed")
        return self._obj

    def _map(self, name: str) -> int:
        m = _find_map(self._handle(), name.encode())
        if not m:
            raise OSError(_errno.ENOENT, f"bpf_object__find_map_by_name({name}): no such map in {self.path}")
        return m

    def _prog(self, name: str) -> int:
        p = _find_prog(self._handle(), name.encode())
        if not p:
            raise OSError(
                _errno.ENOENT, f"bpf_object__find_program_by_name({name}): no such program in {self.path}"
            )
        return p

    @property
    def map_names(self) -> list[str]:
        """Names of the object's maps, as in the C source (``.rodata``/``.bss`` included if any)."""
        names, m = [], _next_map(self._handle(), None)
        while m:
            names.append(_map_name(m).decode())
            m = _next_map(self._handle(), m)
        return names

    @property
    def prog_names(self) -> list[str]:
        """Names of the object's programs (the C function names)."""
        names, p = [], _next_prog(self._handle(), None)
        while p:
            names.append(_prog_name(p).decode())
            p = _next_prog(self._handle(), p)
        return names

    def set_max_entries(self, map_name: str, max_entries: int) -> None:
        """Resize a map before :meth:`load` (``bpf_map__set_max_entries``)."""
        _check(f"bpf_map__set_max_entries({map_name}, {max_entries})", _map_set_max(self._map(map_name), max_entries))

    def set_pin_path(self, map_name: str, path: str | os.PathLike | None) -> None:
        """Pin a map at ``path`` on :meth:`load`, or reuse the map already pinned there (``bpf_map__set_pin_path``).

        A pinned map is reused only if compatible (type, key/value size, max_entries, flags),
        otherwise load fails. ``None`` clears the pin path.
        """
        p = os.fspath(path).encode() if path is not None else None
        _check(f"bpf_map__set_pin_path({map_name}, {path})", _map_set_pin(self._map(map_name), p))

    def load(self) -> None:
        """Create the maps (or reuse pinned ones), load and verify every program (``bpf_object__load``).

        On failure the OSError message ends with libbpf's log, verifier output included.
        """
        _log_clear()
        ret = _obj_load(self._handle())
        if ret < 0:
            _raise(f"bpf_object__load({self.path})", ret, _log_since()[-8000:])
        self.loaded = True

    def prog_fd(self, name: str) -> int:
        """The fd of loaded program ``name`` (owned by this object: do not close it)."""
        return _check(f"bpf_program__fd({name})", _prog_fd(self._prog(name)))

    def map_fd(self, name: str) -> int:
        """The fd of map ``name`` after :meth:`load` (owned by this object: do not close it)."""
        return _check(f"bpf_map__fd({name})", _map_fd(self._map(name)))

    def close(self) -> None:
        """Free the object and close its fds (``bpf_object__close``); idempotent."""
        if getattr(self, "_obj", None) is not None:
            _obj_close(self._obj)
            self._obj = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# -- maps, on fds -----------------------------------------------------------------------------------


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Insert or replace ``key`` -> ``value`` (``bpf_map_update_elem``; flags BPF_ANY/NOEXIST/EXIST).

    For a per-CPU map ``value`` holds one value per possible CPU, each rounded up to 8 bytes.
    """
    _check(f"bpf_map_update_elem(fd={fd})", _update(fd, _buf(key), _buf(value), flags))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value of ``key``, or None when absent (``bpf_map_lookup_elem``).

    ``value_size`` is the map's value size; for a per-CPU map, ncpus * round_up(value size, 8)
    (see :func:`director.dataplane.bpf_structs.percpu_size`).
    """
    out = ctypes.create_string_buffer(value_size)
    ret = _lookup(fd, _buf(key), out)
    if ret == -_errno.ENOENT:
        return None
    _check(f"bpf_map_lookup_elem(fd={fd})", ret)
    return out.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; True if it was there, False if absent (``bpf_map_delete_elem``)."""
    ret = _delete(fd, _buf(key))
    if ret == -_errno.ENOENT:
        return False
    _check(f"bpf_map_delete_elem(fd={fd})", ret)
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after ``key`` (the first key when ``key`` is None or absent), None at the end.

    ``bpf_map_get_next_key``; for an ARRAY map the keys are the indexes.
    """
    out = ctypes.create_string_buffer(key_size)
    ret = _next_key(fd, None if key is None else _buf(key), out)
    if ret == -_errno.ENOENT:
        return None
    _check(f"bpf_map_get_next_key(fd={fd})", ret)
    return out.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Iterate over the keys of a map. Entries deleted meanwhile may restart a hash map's walk
    (kernel semantics of get_next_key on a vanished key), so collect keys before deleting many."""
    key = map_next_key(fd, None, key_size)
    while key is not None:
        yield key
        key = map_next_key(fd, key, key_size)


def array_values(fd: int, value_size: int, max_entries: int) -> list[bytes]:
    """Every value of an ARRAY map, index order, in as few system calls as the kernel allows
    (``bpf_map_lookup_batch``: one for the whole array where a walk by keys would take two per
    index; the daemon reads its 65,536-entry ``servers`` so at start)."""
    keys = ctypes.create_string_buffer(4 * max_entries)
    values = ctypes.create_string_buffer(value_size * max_entries)
    token = ctypes.create_string_buffer(4)
    out: list[bytes] = []
    first = True
    while len(out) < max_entries:
        count = _c_uint32(max_entries - len(out))
        ret = _lookup_batch(fd, None if first else token, token, keys, values, ctypes.byref(count), None)
        first = False
        raw = values.raw
        out.extend(raw[i * value_size:(i + 1) * value_size] for i in range(count.value))
        if ret == -_errno.ENOENT or count.value == 0:
            break
        _check(f"bpf_map_lookup_batch(fd={fd})", ret)
    return out


def map_items(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, bytes]]:
    """Iterate over (key, value) pairs; entries that vanish between the two calls are skipped."""
    for key in map_keys(fd, key_size):
        value = map_lookup(fd, key, value_size)
        if value is not None:
            yield key, value


class MapInfo(NamedTuple):
    """What the kernel says about a map (the head of ``struct bpf_map_info``)."""

    type: int  # enum bpf_map_type (1 HASH, 2 ARRAY, 5 PERCPU_HASH, 6 PERCPU_ARRAY, ...)
    id: int
    key_size: int
    value_size: int  # one CPU's value for per-CPU maps
    max_entries: int
    flags: int
    name: str  # the kernel's copy, truncated to 15 characters


def map_info(fd: int) -> MapInfo:
    """Type, id, key and value sizes, max_entries, flags and name of a map (``bpf_obj_get_info_by_fd``)."""
    info = _MapInfoHead()
    size = _c_uint32(ctypes.sizeof(info))
    _check(f"bpf_obj_get_info_by_fd(fd={fd})", _info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)))
    return MapInfo(
        info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags, info.name.decode()
    )


# -- pinned objects, fds ----------------------------------------------------------------------------


def obj_get(path: str | os.PathLike) -> int:
    """Open a pinned map or program (``bpf_obj_get``); the caller owns the fd (:func:`close_fd`)."""
    ctypes.set_errno(0)
    return _check(f"bpf_obj_get({os.fspath(path)})", _obj_get(os.fspath(path).encode()))


def obj_pin(fd: int, path: str | os.PathLike) -> None:
    """Pin a map or program fd at ``path`` in bpffs (``bpf_obj_pin``); remove it with os.unlink."""
    _check(f"bpf_obj_pin(fd={fd}, {os.fspath(path)})", _obj_pin(fd, os.fspath(path).encode()))


def close_fd(fd: int) -> None:
    """Close an fd this module handed out (from :func:`obj_get`)."""
    os.close(fd)


_prog_get_fd_by_id = _fn("bpf_prog_get_fd_by_id", _c_int, _c_uint32)
_obj_get_info_by_fd = _fn("bpf_obj_get_info_by_fd", _c_int, _c_int, _c_void_p, ctypes.POINTER(_c_uint32))
_PROG_INFO_ID = slice(4, 8)  # struct bpf_prog_info (linux/bpf.h): __u32 type, then __u32 id
_PROG_INFO_NAME = slice(64, 80)  # char name[16] at offset 64


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of a loaded program by its id (``bpf_prog_info.name``); None if it cannot be read
    (gone meanwhile, or not ours to open)."""
    fd = _prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = ctypes.create_string_buffer(80)  # zeroed: no pointer field asks for a copy
        size = _c_uint32(len(info))
        if _obj_get_info_by_fd(fd, info, ctypes.byref(size)) < 0:
            return None
        return info.raw[_PROG_INFO_NAME].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def prog_id(fd: int) -> int:
    """The id of a program we hold an fd of (``bpf_prog_info.id``). Unlike opening a program by its
    id, this needs no CAP_SYS_ADMIN: the fd is our own (from a load or a pin)."""
    info = ctypes.create_string_buffer(80)
    size = _c_uint32(len(info))
    _check("bpf_obj_get_info_by_fd", _obj_get_info_by_fd(fd, info, ctypes.byref(size)))
    return int.from_bytes(info.raw[_PROG_INFO_ID], "little")


def num_possible_cpus() -> int:
    """Possible CPUs (``libbpf_num_possible_cpus``): the number of slots of a per-CPU map value."""
    return _check("libbpf_num_possible_cpus()", _num_cpus())


# -- BPF_PROG_TEST_RUN ------------------------------------------------------------------------------


class TestRun(NamedTuple):
    """The result of one BPF_PROG_TEST_RUN."""

    __test__ = False  # not a pytest class

    retval: int  # the program's return code (TC_ACT_* for tc)
    data_out: bytes  # the packet after the program (grown or shrunk by it)
    duration: int  # average ns per repetition


def prog_test_run(
    prog_fd: int,
    data_in: bytes,
    *,
    data_out_size: int | None = None,
    repeat: int = 1,
    ctx_in: bytes | None = None,
) -> TestRun:
    """Run a loaded program on ``data_in`` in the kernel (``bpf_prog_test_run_opts``).

    For tc programs ``data_in`` is an Ethernet frame; the skb belongs to the calling thread's
    network namespace (helpers such as bpf_fib_lookup see that namespace). ``data_out_size`` bounds
    the returned packet (default: input + 512 bytes, room for encapsulation). ``ctx_in`` is an
    optional ``struct __sk_buff`` image (only the fields the kernel accepts may be non-zero).
    Maps are not reset between runs.
    """
    data_in = bytes(data_in)
    size_out = data_out_size if data_out_size is not None else len(data_in) + 512
    inbuf = _buf(data_in)
    outbuf = ctypes.create_string_buffer(max(size_out, 1))
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(inbuf, _c_void_p)
    opts.data_size_in = len(data_in)
    opts.data_out = ctypes.cast(outbuf, _c_void_p)
    opts.data_size_out = size_out
    opts.repeat = repeat
    if ctx_in is not None:
        ctxbuf = _buf(ctx_in)
        opts.ctx_in = ctypes.cast(ctxbuf, _c_void_p)
        opts.ctx_size_in = len(ctx_in)
    _check(f"bpf_prog_test_run_opts(fd={prog_fd})", _test_run(prog_fd, ctypes.byref(opts)))
    return TestRun(opts.retval, outbuf.raw[: opts.data_size_out], opts.duration)
