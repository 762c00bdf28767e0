"""The ``vpn-director`` command: ``run``, ``check``, ``reload``, ``cleanup``, ``demo``.

Argument parsing and dispatch only: ``run`` builds a director.daemon.Daemon, wires the signals
to its flags and systemd's readiness notifications (``sd_notify``) to it, and runs it in the
foreground; the other commands validate a config, ask a running daemon to reload, remove what a
daemon left in the kernel, or run a demo.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from director import config as config_mod
from director import reconcile
from director.control_client import control_request
from director.daemon import DATAPLANES, Daemon

log = logging.getLogger(__name__)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness: one datagram to $NOTIFY_SOCKET, if set."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify.failed state=%s error=%s", state, e)


def cleanup(cfg: config_mod.Config) -> int:
    """Everything a daemon (running or crashed) installed in this namespace, removed."""
    from pyroute2 import IPRoute

    from director.dataplane import iptables, routing
    from director.dataplane.ebpf import FastPath

    iptables.remove()
    with IPRoute() as ipr:
        routing.remove_all(ipr)
        ifindexes = [i for name in (cfg.daemon.client_interface, cfg.daemon.server_interface)
                     for i in ipr.link_lookup(ifname=name)]
        FastPath.remove(ipr, ifindexes, Path(cfg.daemon.bpf_pin_dir))
    print("vpn-director: rules, routes, eBPF programs and maps removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vpn-director", description="IPsec-aware load-balancing director.")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the director in the foreground (as systemd does)")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument("--dataplane", choices=DATAPLANES, default="auto",
                     help="auto (default): the eBPF fast path where the kernel allows it, else NFQUEUE alone")
    run.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    chk = sub.add_parser("check", help="validate a config file and exit")
    chk.add_argument("--config", required=True)
    cln = sub.add_parser("cleanup", help="remove every rule, route, eBPF program and map a daemon left (not running)")
    cln.add_argument("--config", required=True)
    rel = sub.add_parser("reload", help="ask the running daemon to re-read its config; fails if it refuses")
    rel.add_argument("--socket", default=config_mod.DaemonConfig().control_socket, help="control socket")
    demo = sub.add_parser("demo", help="bring up the namespace lab, balance real IKE/ESP packets, tear down")
    demo.add_argument("--core", action="store_true", help="only the decision core on crafted packets (no kernel)")
    demo.add_argument("--clients", type=int, default=6, help="--core: number of crafted clients (default 6)")
    demo.add_argument("--scheduler", default="wlc", help="scheduler name (default wlc)")
    demo.add_argument("--modes", default="dr,tun,nat", help="forwarding modes to show (default dr,tun,nat)")
    demo.add_argument("--dataplane", choices=DATAPLANES, default="auto", help="the daemon's dataplane (default auto)")
    demo.add_argument("--peers", choices=("both", "crafted", "strongswan"), default="both",
                      help="crafted IKE/ESP packets, real strongSwan clients and servers, or both (default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "check":
            cfg = config_mod.load(args.config)
            reconcile.validate(cfg)  # what run checks: limits, services, schedulers and options
            for line in config_mod.consistency_warnings(cfg):
                print(f"vpn-director: warning: {line}", file=sys.stderr)
            print(f"{args.config}: ok ({len(cfg.services)} services)")
            return 0
        if args.command == "reload":
            answer = control_request(args.socket, {"cmd": "reload"})
            if not answer.get("ok"):
                print(f"vpn-director: reload refused: {answer.get('error')}", file=sys.stderr)
                return 1
            print(f"reloaded: {answer['result']}")
            return 0
        if args.command == "demo":
            if args.core:
                from director.lab.demo import run_core_demo

                return run_core_demo(clients=args.clients, scheduler=args.scheduler)
            from director.lab.demo import run_lab_demo

            return run_lab_demo(modes=args.modes.split(","), scheduler=args.scheduler, dataplane=args.dataplane,
                                peers=args.peers)
        if args.command == "cleanup":
            return cleanup(config_mod.load(args.config))
        cfg = config_mod.load(args.config)
        daemon = Daemon(cfg, config_path=args.config, dataplane=args.dataplane, notify=sd_notify)
    except config_mod.ConfigErrors as e:
        for line in e.errors:
            print(f"vpn-director: {line}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"vpn-director: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reload: no daemon listening
        print(f"vpn-director: {e}", file=sys.stderr)
        return 3
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, daemon.request_reload)
    try:
        daemon.start()
    except (ValueError, OSError) as e:
        print(f"vpn-director: {e}", file=sys.stderr)
        daemon.stop()
        return 1
    try:
        daemon.run()
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
