#!/usr/bin/env bash
# Prometheus and promtool for tests/test_observability.py, from Debian's `prometheus` package, installed
# only when either binary is missing. The tests start their own server on a free loopback port with a
# temporary storage dir, so a service the package may start (on :9090) is never used by them; a
# policy-rc.d that denies starts is put in place for the install where the machine has none, so that
# nothing is left running on machines where the package would start it.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi

$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null && command -v promtool >/dev/null
prometheus --version 2>&1 | sed -n 1p
