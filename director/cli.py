"""vpnadm, the ipvsadm-like operator CLI (a thin client of the daemon's control socket; issue 4)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vpnadm",
        description="Administer an IPsec virtual service of vpn-director (ipvsadm-like). "
        "The control socket is not built yet; this command only prints its help.",
    )
    p.parse_args(argv)
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
