#!/usr/bin/env bash
# Installs everything Ferry needs to build, run, test and benchmark on a Debian
# machine (see docs/ebpf-toolchain.md for why each toolchain piece is needed).
# Idempotent: every step is skipped when what it installs is already present, so it is
# cheap to run before every `run`/`test`. `--vm` also installs what `cargo xtask vm`
# needs (QEMU and debootstrap, for the KVM test VM in vm-test/).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (it installs apt packages)" >&2
  exit 1
fi

# Build: Debian's rustc 1.96 ships a prebuilt `core` for bpfel-unknown-none and the LLVM
# that bpf-linker must link against. Run/test: the kernel tools the agent and the netns
# tests drive. Bench: the baselines it compares against.
APT_PACKAGES=(
  rustc-web libstd-rust-web-dev-bpf cargo-web llvm-22-dev
  build-essential pkg-config curl ca-certificates
  iproute2 iptables nftables conntrack ipset bpftool procps util-linux
  dnsutils curl
  haproxy dnsperf knot unbound dnsmasq-base fonts-dejavu-core
)
if [ "${1:-}" = "--vm" ]; then
  APT_PACKAGES+=(qemu-system-x86 debootstrap e2fsprogs)
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The benchmark baselines (haproxy, knot, unbound) ship services; never let the
  # package scripts start them on this host.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
command -v kubectl >/dev/null 2>&1 || { echo "install-deps: apt installing kubernetes-client (kubectl, for the deploy tests)"; apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client; }

# rustup's stable toolchain builds the host crates, and aya-build drives the eBPF build
# through `rustup run`. Debian 12 packages no rustup and nothing is fetched from outside
# the package registries, so it must come with the machine.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null 2>&1; then
  echo "install-deps: rustup is required (with a stable toolchain) but not installed;" >&2
  echo "install-deps: install it from your distribution (e.g. Debian 13's rustup package)." >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component" || echo "install-deps: could not add $component (only needed for lint)"
  fi
done

# Debian's rustc as the toolchain aya-build uses for the eBPF crate.
if ! rustup toolchain list | grep -q '^debian-web'; then
  echo "install-deps: linking Debian's rustc as toolchain debian-web"
  rustup toolchain link debian-web /usr
fi

BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  echo "install-deps: building bpf-linker $BPF_LINKER_VERSION against LLVM 22"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked \
    --no-default-features --features llvm-22
fi

# Fuzzing (`cargo xtask fuzz`): cargo-fuzz drives the targets of fuzz/ on rustup's
# nightly toolchain, which, like stable, must come with the machine.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo-fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "install-deps: building cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install "cargo-fuzz@$CARGO_FUZZ_VERSION" --locked
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "install-deps: no nightly toolchain: \`cargo xtask fuzz\` will not run (everything else does)" >&2
fi

echo "install-deps: all dependencies present"
