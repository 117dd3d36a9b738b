#!/bin/sh
# PID 1 of the VM that `cargo xtask vm` boots (see vm-test/README.md): mounts what
# the tests need, runs every test executable the host built, prints the result line
# the host waits for, and powers off. For `cargo xtask run --vm` (a `demo` file holds
# the mode) it starts the demo instead, then a shell on the console or the given
# command.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
hostname ferry-vm
ip link set lo up
echo "ferry-vm: kernel $(uname -r)"

# The build staged by `cargo xtask vm` (xtask/src/vm.rs): tests find the agent and
# the repository files they read here, not at the host's paths.
export FERRY_BIN_DIR=/ferry-vm/bin FERRY_REPO_ROOT=/ferry-vm/repo
cd /ferry-vm/repo || exit 1
poweroff_now() {
    sync
    echo o > /proc/sysrq-trigger
    sleep 10
}

if [ -f /ferry-vm/demo ]; then
    export PATH="/ferry-vm/bin:$PATH"
    xtask run --prebuilt --mode "$(cat /ferry-vm/demo)" --manifests examples \
        > /ferry-vm/demo.log 2>&1 &
    demo=$!
    i=0
    until grep -q "is running on the demo node" /ferry-vm/demo.log; do
        i=$((i + 1))
        if ! kill -0 "$demo" 2>/dev/null || [ "$i" -gt 600 ]; then
            cat /ferry-vm/demo.log
            echo "ferry-vm: the demo did not start"
            echo "FERRY-VM-RESULT: 1"
            poweroff_now
        fi
        sleep 1
    done
    cat /ferry-vm/demo.log
    if [ -f /ferry-vm/demo-command ]; then
        sh -c "$(cat /ferry-vm/demo-command)"
        rc=$?
    else
        echo "ferry-vm: a shell in the VM (the demo node is up); 'exit' powers off"
        setsid -c sh -c 'exec bash -i <>/dev/ttyS0 >&0 2>&1'
        rc=0
    fi
    kill -TERM "$demo"
    wait "$demo"
    echo "FERRY-VM-RESULT: $rc"
    poweroff_now
fi

rc=0
# Each line: a test executable and its arguments (test name filters).
while read -r t args; do
    echo "ferry-vm: running $t $args"
    # shellcheck disable=SC2086 # the arguments are split on purpose
    "$t" --test-threads=2 $args || rc=1
done < /ferry-vm/tests.list
echo "FERRY-VM-RESULT: $rc"
poweroff_now
