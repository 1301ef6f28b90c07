#!/usr/bin/env bash
# The lab over real OpenSSH, on one machine: a netlab's namespaces stand in for the hosts, sshd
# runs in the backends and lb namespaces, and `ringlab sweep` runs in the client namespace,
# reaching them as ssh:root@198.18.0.3 and ssh:root@198.18.0.2. This is the --place path a lab
# with real machines takes, batch-mode ssh included.
#
# Usage: scripts/ssh_netns.sh [extra sweep flags, e.g. --mode tcp -c 1-5 --repeat 3]
# Needs root and openssh-server (apt-get install -y openssh-server); the sshd service is not
# used. Everything made lives in the namespaces and a temporary folder (its own host key, key
# pair, sshd and ssh configs); the sshd processes started here are stopped by pid, and the
# namespaces removed, on the way out.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "needs root (it builds network namespaces)" >&2; exit 1; }
[ -x /usr/sbin/sshd ] || { echo "needs sshd: apt-get install -y openssh-server" >&2; exit 1; }
cargo build --release --quiet
bin=$PWD/target/release/ringlab
prefix=rlssh
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  "$bin" netlab down --prefix "$prefix" >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$bin" netlab up --prefix "$prefix" >/dev/null
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/id"
cp "$work/id.pub" "$work/authorized_keys"
cat >"$work/sshd_config" <<EOF
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
PidFile none
EOF
# sshd's privilege-separation directory (the package makes it at boot through tmpfiles).
mkdir -p /run/sshd
for role in backends=198.18.0.3 lb=198.18.0.2; do
  ip netns exec "$prefix-${role%%=*}" /usr/sbin/sshd -D -f "$work/sshd_config" \
    -o "ListenAddress=${role#*=}" -E "$work/sshd-${role%%=*}.log" &
  pids+=($!)
done
# The sweep calls `ssh`; this one is OpenSSH with the key and a known-hosts file of our own.
cat >"$work/ssh_config" <<EOF
Host *
  IdentityFile $work/id
  UserKnownHostsFile $work/known_hosts
  StrictHostKeyChecking accept-new
EOF
mkdir "$work/bin"
printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$work/ssh_config" >"$work/bin/ssh"
chmod +x "$work/bin/ssh"
for addr in 198.18.0.3 198.18.0.2; do
  for _ in $(seq 1 100); do
    if ip netns exec "$prefix-client" bash -c "exec 3<>/dev/tcp/$addr/22" 2>/dev/null; then break; fi
    sleep 0.05
  done
done

ip netns exec "$prefix-client" env PATH="$work/bin:$PATH" "$bin" sweep --remote-bin "$bin" \
  --place backends=ssh:root@198.18.0.3 --place lb=ssh:root@198.18.0.2 --place client=local \
  --label lab-ssh-netns "$@"
