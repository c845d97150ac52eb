#!/usr/bin/env bash
# Make sure the system tools the local services need are present: Java 17+, Maven, and the
# PostgreSQL server binaries. Installs what is missing with apt-get when run as root on Debian;
# otherwise says in one line what to install.
set -euo pipefail

missing=()
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || [ -n "${KAFKA_HOME:-}" ] || missing+=(maven)
if [ -z "${PG_BIN:-}" ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  missing+=(postgresql)
fi
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
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
