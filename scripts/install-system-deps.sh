#!/usr/bin/env bash
# Make sure the system tools the local services need are present: Java 17+, Maven, the
# PostgreSQL server binaries, and Prometheus with promtool (`make monitor` and its tests).
# Installs what is missing with apt-get when run as root on Debian; otherwise says in one line
# what to install.
set -euo pipefail

missing=()
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || [ -n "${KAFKA_HOME:-}" ] || missing+=(maven)
if [ -z "${PG_BIN:-}" ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  missing+=(postgresql)
fi
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing system packages: ${missing[*]} (install them, or set PG_BIN / KAFKA_HOME)" >&2
  exit 2
fi
echo "installing system packages: ${missing[*]}"
# Debian's postgresql package would create and start a cluster on port 5432; we run our own.
mkdir -p /etc/postgresql-common
grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf \
  || echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
# Debian's prometheus package would start its own service on :9090 (and recommends the node
# exporter); `make monitor` runs its own. A policy-rc.d that says 101 stops any service start
# during the install, whether systemd runs or not; one already there (as in containers) is kept.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Under systemd it would still start at the next boot.
if [ -d /run/systemd/system ] && [ -e /lib/systemd/system/prometheus.service ]; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
