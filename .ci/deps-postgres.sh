#!/usr/bin/env bash
# The ledger tests run against a real PostgreSQL server that they start themselves (tests/pg.py:
# initdb into a temporary directory, 127.0.0.1 on a free port). This installs the Debian server
# package only when no PostgreSQL binaries are present, without creating or starting the packaged
# `main` cluster: nothing needs a system service.
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
  command -v sudo >/dev/null || {
    echo "deps-postgres: PostgreSQL is missing and installing it needs root (or sudo)" >&2
    exit 1
  }
else
  SUDO=
fi

export DEBIAN_FRONTEND=noninteractive
echo "deps-postgres: installing the Debian postgresql package"
$SUDO apt-get update -qq
# postgresql-common first, told not to create (and so not start) a `main` cluster on install.
$SUDO apt-get install -y -qq postgresql-common >/dev/null
if [ -f /etc/postgresql-common/createcluster.conf ]; then
  $SUDO sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
    /etc/postgresql-common/createcluster.conf
fi
$SUDO apt-get install -y -qq postgresql >/dev/null

compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || {
  echo "deps-postgres: postgresql installed but no /usr/lib/postgresql/*/bin/initdb found" >&2
  exit 1
}
