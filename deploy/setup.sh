#!/usr/bin/env bash
# One idempotent setup step for a fresh Debian 12 machine, run as root:
# Debian packages, the legacy iptables backend, bpffs, a virtualenv (.venv)
# with the director installed editable plus its test tools, and the eBPF objects
# (ebpf/build, where a director run from this tree finds them). One line per step.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iptables iproute2 ethtool tcpdump
  libnetfilter-queue-dev libnfnetlink-dev pkg-config build-essential
  python3 python3-venv python3-dev
  clang llvm libbpf-dev bpftool
  prometheus keepalived
  strongswan-charon strongswan-swanctl strongswan-pki
  libstrongswan-standard-plugins libstrongswan-extra-plugins libcharon-extra-plugins
  iperf3 iputils-ping
  bird2
)

log() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (it installs Debian packages and uses netfilter)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # prometheus, keepalived and strongswan would start system services from their postinst: the
  # lab runs its own instances in namespaces, so forbid service starts during the install
  # (Debian's policy-rc.d convention, exit 101 = action forbidden), and restore what was there.
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi
# bird2's postinst enables its system unit; the lab runs one BIRD per namespace, never that one.
if [ -e /lib/systemd/system/bird.service ]; then systemctl disable bird.service >/dev/null 2>&1 || rm -f /etc/systemd/system/multi-user.target.wants/bird.service; fi

# python-iptables drives libiptc, i.e. the legacy tables only.
for t in iptables ip6tables; do
  if [ -x "/usr/sbin/${t}-legacy" ]; then
    update-alternatives --set "$t" "/usr/sbin/${t}-legacy" >/dev/null
  fi
done
log "iptables: legacy backend"

# bpffs is not always mounted at boot (systemd mounts it; a container or a bare init may not);
# pinned maps live there.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
  log "bpffs mounted on /sys/fs/bpf"
else
  log "bpffs present on /sys/fs/bpf"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip > .venv/pip-install.log 2>&1 || { cat .venv/pip-install.log >&2; exit 1; }
fi
# The editable install follows the source tree by itself (new modules included); it is redone
# only when the packaging metadata (dependencies, console scripts) changed since the last one.
stamp=.venv/.vpn-director-installed
want=$(sha256sum pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the director (editable) and test tools into .venv"
  # pip's own chatter (setuptools' editable-install notice, the local index's warnings) goes to a
  # log shown only when the install fails: one line per step.
  if ! .venv/bin/python -m pip install -q -e '.[test]' > .venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log >&2
    echo "setup: pip install failed (log above, kept in .venv/pip-install.log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
else
  log "director (editable) and test tools already in .venv"
fi
make -s -C ebpf
log "eBPF objects up to date in ebpf/build (make -C ebpf)"
log "done"
