#!/usr/bin/env bash
# A PostgreSQL server on 127.0.0.1:5432 for the PostgreSQL half of the registry tests
# (Debian's packages; loopback only, trust auth for the test user). Does nothing when one
# already answers there; otherwise installs and starts one where apt-get can run as root,
# or says why not and carries on (the PostgreSQL tests then skip, or fail under CI=true).
set -uo pipefail
HOST=127.0.0.1
PORT=5432
if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$HOST" -p "$PORT"; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "no PostgreSQL on $HOST:$PORT (as root: apt-get install postgresql); the PostgreSQL tests will skip" >&2
  exit 0
fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "installing Debian's postgresql for the registry tests" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || exit 0
fi
VERSION=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
if [[ -z "$VERSION" ]]; then
  echo "postgresql installed but no cluster found; the PostgreSQL tests will skip" >&2
  exit 0
fi
CONF=/etc/postgresql/$VERSION/main
# Loopback only; trust for local test connections (never use this setup for real data).
sed -i "s/^#\?listen_addresses.*/listen_addresses = '$HOST'/" "$CONF/postgresql.conf"
if ! grep -q "llmops-tests" "$CONF/pg_hba.conf"; then
  sed -i "1i host all all $HOST/32 trust # llmops-tests" "$CONF/pg_hba.conf"
fi
pg_ctlcluster "$VERSION" main restart || pg_ctlcluster "$VERSION" main start
for _ in $(seq 1 30); do
  pg_isready -q -h "$HOST" -p "$PORT" && break
  sleep 1
done
psql -h "$HOST" -U postgres -tc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
  || psql -h "$HOST" -U postgres -c "CREATE DATABASE test" >/dev/null
echo "PostgreSQL $VERSION listening on $HOST:$PORT" >&2
