#!/usr/bin/env bash
# Makes a cluster's TLS files with openssl (docs/operations.md, "TLS"):
#
#   scripts/make-certs.sh DIR NODE [NODE...] [-- HOST...]
#
# DIR/ca.crt and DIR/ca.key: the cluster's CA (made once; kept if DIR already has one).
# DIR/NODE.crt and DIR/NODE.key for each NODE: a certificate signed by the CA whose common name
# is the node's name (keel-node --name) and whose subjectAltName lists the name, localhost, and
# each HOST given after "--" (the names clients reach the nodes by). Keys are readable by their
# owner only. Keep ca.key offline: a node needs ca.crt, its own .crt and its own .key.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "usage: make-certs.sh DIR NODE [NODE...] [-- HOST...] (--help: more)" >&2
  exit 2
fi
dir=$1
shift
nodes=()
hosts=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then
    shift
    hosts=("$@")
    break
  fi
  nodes+=("$1")
  shift
done
for n in "${nodes[@]}"; do
  if ! [[ "$n" =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]]; then
    echo "make-certs: node name '$n': use letters, digits, '.' and '-' (it is a DNS name)" >&2
    exit 2
  fi
done
umask 077
mkdir -p "$dir"
if [ ! -f "$dir/ca.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=keel cluster CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  echo "make-certs: made the CA, $dir/ca.crt (its key: $dir/ca.key)"
fi
for n in "${nodes[@]}"; do
  san="DNS:$n,DNS:localhost"
  for h in "${hosts[@]}"; do
    if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
  done
  ext=$(mktemp)
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
    "$san" >"$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$n" \
    -keyout "$dir/$n.key" -out "$dir/$n.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$n.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -extfile "$ext" -out "$dir/$n.crt" 2>/dev/null
  rm -f "$ext" "$dir/$n.csr"
  echo "make-certs: $dir/$n.crt ($san)"
done
