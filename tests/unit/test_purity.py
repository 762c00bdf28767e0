"""House rules that code review tends to miss: the pure core does no I/O; mirrors agree."""

import ast
import re
from pathlib import Path

from director.drop_reasons import DropReason

ROOT = Path(__file__).resolve().parents[2]
# every module that is pure by design: bytes, numbers and time in, decisions out
PURE = sorted([
    "director/packet.py",
    "director/isakmp_state.py",
    "director/conntrack.py",
    "director/core.py",
    "director/service.py",
    "director/drop_reasons.py",
    "director/ratelimit.py",
    "director/ingress.py",
    "director/health.py",
    "director/config.py",
    "director/control.py",
    "director/reconcile.py",
    "director/sync.py",
    "director/counters.py",
    "director/views.py",
    "director/announce.py",
    "director/spi_label.py",
    *(str(p.relative_to(ROOT)) for p in (ROOT / "director/schedulers").glob("*.py")),
    *(str(p.relative_to(ROOT)) for p in (ROOT / "director/forwarding").glob("*.py")),
])
FORBIDDEN = {"socket", "os", "subprocess", "netfilterqueue", "iptc", "pyroute2", "scapy", "ctypes", "select", "time"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, director's own as dotted paths."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names.add(a.name if a.name.startswith("director.") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("director"):
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)  # from director.x import y
            else:
                names.add(node.module.split(".")[0])
    return names


def _director_module(name: str) -> str | None:
    """The file of a director module name, if it is one (a package is its __init__.py)."""
    parts = name.split(".")
    if parts[0] != "director":
        return None
    as_file, as_pkg = ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")
    for f in (as_file, as_pkg):
        if f.is_file():
            return str(f.relative_to(ROOT))
    return None


def test_pure_core_imports_no_io_modules():
    offenders = {p: sorted(_imports(ROOT / p) & FORBIDDEN) for p in PURE}
    offenders = {p: bad for p, bad in offenders.items() if bad}
    assert offenders == {}


def test_pure_modules_import_only_pure_director_modules():
    """Purity is transitive: a pure module importing an adapter would do its I/O too."""
    impure = {}
    for p in PURE:
        deps = {m for m in map(_director_module, _imports(ROOT / p)) if m and m not in (p, "director/__init__.py")}
        bad = sorted(deps - set(PURE))
        if bad:
            impure[p] = bad
    assert impure == {}


def test_the_purity_list_names_real_files_and_the_forwarding_package():
    assert all((ROOT / p).is_file() for p in PURE)
    assert "director/forwarding/method.py" in PURE and "director/sync.py" in PURE


def test_drop_reasons_header_mirrors_the_enum():
    text = (ROOT / "ebpf/include/drop_reasons.h").read_text()
    in_c = {m.group(1): int(m.group(2)) for m in re.finditer(r"DROP_([A-Z0-9_]+)\s*=\s*(\d+)", text)}
    assert in_c == {r.name: int(r) for r in DropReason}
