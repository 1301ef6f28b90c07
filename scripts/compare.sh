#!/usr/bin/env bash
# ringlab against HAProxy and nginx, measured side by side in one run (see scripts/compare.py).
# Installs the peers with apt-get when run as root and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v wrk >/dev/null || need+=(wrk)
command -v ab >/dev/null || need+=(apache2-utils)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
  else
    echo "missing: ${need[*]} (apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi
exec python3 scripts/compare.py "$@"
