#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need, once. Safe to
# run again: it installs only what is missing.
set -euo pipefail
pkgs=(etcd-server qemu-system-x86 busybox-static ipset conntrack ipvsadm iproute2 iptables kmod cpio curl)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "deps: installing ${missing[*]} (apt-get; needs root)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	apt-get install -y -q "${missing[@]}" >/dev/null
fi
echo "deps: system packages present"
