#!/bin/busybox sh
# SPDX-License-Identifier: GPL-2.0-only
#
# PID 1 of the schedcp sandbox guest, and its agent.
#
# Mounts the kernel filesystems a sched_ext sandbox needs (proc, sys, devtmpfs, debugfs, tracefs,
# bpffs, cgroup2, tmpfs), finds the agent channel (a virtio-serial port named org.schedcp.agent, or
# ttyS1), and hands over to schedcp-agent (agent.c), which serves the host's requests over it. The
# idle poweroff delay comes from the kernel command line (schedcp.idle=SECONDS, 0 = never), and so does
# schedcp.ephemeral=1: power off as soon as the host closes the channel (the owner died).
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LC_ALL=C

mkdir -p /proc /sys /dev /tmp /run /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ip link set lo up 2>/dev/null
ulimit -l unlimited 2>/dev/null
ulimit -n 65536 2>/dev/null

idle=0
ephemeral=0
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	schedcp.idle=*) idle=${arg#schedcp.idle=} ;;
	schedcp.ephemeral=*) ephemeral=${arg#schedcp.ephemeral=} ;;
	esac
done

dev=
i=0
while [ -z "$dev" ] && [ $i -lt 100 ]; do
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat "$p/name" 2>/dev/null)" = org.schedcp.agent ] && [ -e "/dev/${p##*/}" ] && dev=/dev/${p##*/}
	done
	[ -n "$dev" ] || { i=$((i + 1)); sleep 0.05; }
done
if [ -z "$dev" ]; then
	dev=/dev/ttyS1
	stty -F $dev raw -echo 115200 2>/dev/null
fi
echo "schedcp-agent: serving on $dev (idle poweroff: ${idle}s)" >/dev/kmsg

exec /usr/bin/schedcp-agent "$dev" "$idle" "$ephemeral"
