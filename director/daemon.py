"""The vpn-director daemon entry point (the NFQUEUE dataplane lands with issue 3)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vpn-director",
        description="IPsec-aware load-balancing director. "
        "The packet dataplane is not built yet: 'demo' runs the decision core on crafted packets.",
    )
    sub = p.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the decision core on crafted IKE/ESP traffic and print the table")
    demo.add_argument("--clients", type=int, default=6, help="number of crafted clients (default 6)")
    demo.add_argument("--scheduler", default="wlc", help="scheduler name (default wlc)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from director.demo import run_core_demo

        try:
            return run_core_demo(clients=args.clients, scheduler=args.scheduler)
        except ValueError as e:
            print(f"vpn-director: {e}", file=sys.stderr)
            return 2
    build_parser().print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
