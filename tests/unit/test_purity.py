"""House rules that code review tends to miss: the pure core does no I/O; mirrors agree."""

import ast
import re
from pathlib import Path

from director.drop_reasons import DropReason

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    "director/packet.py",
    "director/isakmp_state.py",
    "director/conntrack.py",
    "director/core.py",
    "director/service.py",
    "director/drop_reasons.py",
    "director/announce.py",
    "director/spi_label.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "director/schedulers").glob("*.py")),
]
FORBIDDEN = {"socket", "os", "subprocess", "netfilterqueue", "iptc", "pyroute2", "scapy", "ctypes", "select", "time"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pure_core_imports_no_io_modules():
    offenders = {p: sorted(_imports(ROOT / p) & FORBIDDEN) for p in PURE}
    offenders = {p: bad for p, bad in offenders.items() if bad}
    assert offenders == {}


def test_drop_reasons_header_mirrors_the_enum():
    text = (ROOT / "ebpf/include/drop_reasons.h").read_text()
    in_c = {m.group(1): int(m.group(2)) for m in re.finditer(r"DROP_([A-Z0-9_]+)\s*=\s*(\d+)", text)}
    assert in_c == {r.name: int(r) for r in DropReason}
