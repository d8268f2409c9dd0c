#!/bin/busybox sh
# SPDX-License-Identifier: GPL-2.0-only
#
# PID 1 of the schedcp sandbox guest, and its agent.
#
# Mounts the kernel filesystems a sched_ext sandbox needs (proc, sys, devtmpfs, debugfs, tracefs,
# bpffs, cgroup2, tmpfs), finds the agent channel (a virtio-serial port named org.schedcp.agent, or
# ttyS1), and serves the host over it. The protocol is line headers plus exact-length binary bodies:
#
#   host -> guest   PING <nonce>\n                 guest -> host   PONG <nonce>\n
#   host -> guest   RUN <id> <len>\n<len bytes>    guest -> host   DONE <id> <rc> <len>\n<len bytes>
#   host -> guest   POWEROFF\n                     (the guest syncs and powers off)
#
# A RUN body is a gzipped tar of script.sh, outputs.txt (one relative path a line) and work/ (the
# files); the script runs in work/ and the reply is a gzipped tar of stdout, stderr and out/ (the
# requested outputs that exist). When no request comes for schedcp.idle seconds (kernel command line;
# 0 = never) the guest powers itself off, so a forgotten long-lived VM ends by itself.
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
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	schedcp.idle=*) idle=${arg#schedcp.idle=} ;;
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

halt() {
	sync
	poweroff -f
}

# with an idle timeout, wake up every few seconds to check it even while a client is connected
tmo=
[ "$idle" -gt 0 ] && tmo="-t 5"
exec 3<>"$dev"
echo "READY $(uname -r)" >&3
last=$(date +%s)
while :; do
	cmd=
	if ! read -r $tmo cmd id len <&3 || [ -z "$cmd" ]; then
		# timed out, or the host end is closed (virtio ports read EOF then): wait for the next client
		if [ "$idle" -gt 0 ] && [ $(($(date +%s) - last)) -ge "$idle" ]; then
			echo "schedcp-agent: idle for ${idle}s, powering off" >/dev/kmsg
			halt
		fi
		sleep 0.1
		continue
	fi
	last=$(date +%s)
	case "$cmd" in
	PING)
		echo "PONG $id" >&3
		;;
	POWEROFF)
		halt
		;;
	RUN)
		w=/run/req/$id
		rm -rf "$w"
		mkdir -p "$w/work" "$w/out"
		dd of="$w/req.tgz" bs=65536 count="$len" iflag=fullblock,count_bytes <&3 2>/dev/null
		: >"$w/outputs.txt"
		if tar -xzf "$w/req.tgz" -C "$w" 2>"$w/stderr"; then
			# fd 3 (the channel) is not the script's: background jobs must not hold it
			(cd "$w/work" && exec sh ../script.sh 3>&-) >"$w/stdout" 2>"$w/stderr" </dev/null
			rc=$?
		else
			: >"$w/stdout"
			rc=254
		fi
		while read -r f; do
			[ -n "$f" ] && [ -e "$w/work/$f" ] || continue
			mkdir -p "$w/out/$(dirname "$f")"
			cp -a "$w/work/$f" "$w/out/$f"
		done <"$w/outputs.txt"
		tar -czf "$w/res.tgz" -C "$w" stdout stderr out
		echo "DONE $id $rc $(wc -c <"$w/res.tgz")" >&3
		cat "$w/res.tgz" >&3
		cd /
		rm -rf "$w"
		last=$(date +%s)
		;;
	*)
		echo "ERR unknown command: $cmd" >&3
		;;
	esac
done
