#!/usr/bin/env bash
# Newcomer entry point: installs whatever is missing (idempotent), then runs a
# `cargo xtask` command as root (network namespaces, iptables and eBPF need it).
#   ./dev.sh run     demo node in network namespaces, Ferry serving examples/
#   ./dev.sh test    lint + unit tests + netns integration tests
#   ./dev.sh exec client -- curl -s http://10.96.0.10/
#   ./dev.sh vm      the test suite in a VM on Debian's 6.1 kernel (vm-test/)
#   ./dev.sh fuzz    the fuzz targets (fuzz/), 15 s each; --seconds N TARGET for more
#   ./dev.sh run --vm  the demo inside that VM, with a shell on its console
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi
case "${1:-} ${2:-}" in
  exec*) ;;
  vm*|"run --vm"*) scripts/install-deps.sh --vm ;;
  *) scripts/install-deps.sh ;;
esac
export PATH="$HOME/.cargo/bin:$PATH"
exec cargo xtask "$@"
