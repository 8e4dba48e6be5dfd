#!/bin/sh
# Issues this node's TLS certificate for kvmesh's gRPC servers from the cluster's CA (make-secrets.sh). kvmesh
# servers advertise their node's IP address and clients check the certificate against it, so every node (VM or
# pod) needs a certificate naming its own IPs: this runs on the node, at its start. The image installs it as
# /usr/local/bin/kvmesh-node-cert.
#
#   kvmesh-node-cert CA_DIR OUT_DIR IP [IP...]
#
# CA_DIR holds ca.crt and ca.key; OUT_DIR gets tls.crt, tls.key (mode 600) and ca.crt, which the KVMESH_TLS_CERT,
# KVMESH_TLS_KEY and KVMESH_TLS_CA settings name. 127.0.0.1 is always added.
set -eu
if [ $# -lt 3 ]; then
  echo "usage: kvmesh-node-cert CA_DIR OUT_DIR IP [IP...]" >&2
  exit 2
fi
ca=$1
out=$2
shift 2
san="IP:127.0.0.1"
for ip in "$@"; do
  [ "$ip" = 127.0.0.1 ] || san="$san,IP:$ip"
done
umask 077
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" > "$work/ext"
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -subj "/CN=kvmesh-node" \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
openssl x509 -req -in "$work/tls.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
  -sha256 -days 365 -extfile "$work/ext" -out "$work/tls.crt" 2>/dev/null
cp "$ca/ca.crt" "$work/ca.crt"
mv "$work/tls.key" "$work/tls.crt" "$work/ca.crt" "$out/"
echo "kvmesh-node-cert: $out/tls.crt for $san" >&2
