"""``python -m director.lab up|down|status``: build, remove or list lab topologies by hand.

``up`` leaves the namespaces in place and prints the prefix; ``down --prefix P`` removes a lab's
namespaces and kills whatever runs in them (also the leftovers of a crashed test run);
``status`` lists the labs (all ``vdl??????`` ones, or those with ``--prefix``).
"""

from __future__ import annotations

import argparse
import atexit
import sys

from director.lab.netns import MODES, Lab, LabError, cleanup, list_labs, pids_in_netns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m director.lab", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--mode", choices=MODES, default="dr")
    parser.add_argument("--prefix", help="namespace name prefix (down: required)")
    parser.add_argument("--return-via-director", action="store_true",
                        help="dr/tun: the real servers' default route via the director (return_path = \"director\")")
    args = parser.parse_args(argv)

    if args.command == "up":
        lab = Lab(args.mode, args.prefix, return_via_director=args.return_via_director)
        lab.up()
        atexit.unregister(lab.down)  # the point of `up` is to leave it running
        print(lab.prefix)
        for role, name in lab.ns.items():
            print(f"  {role:<9} {name}")
        return 0
    if args.command == "down":
        if not args.prefix:
            parser.error("down needs --prefix (see `status`)")
        try:
            removed = cleanup(args.prefix)
        except LabError as e:
            print(f"down: {e}", file=sys.stderr)
            return 1
        print(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
        return 0
    labs = list_labs(args.prefix)
    if not labs:
        print("no labs")
    for prefix, names in labs.items():
        print(f"{prefix}: {len(names)} namespaces, {len(pids_in_netns(names))} processes")
        for name in names:
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
