#!/bin/sh
# Makes the secrets a kvmesh cluster needs, as files in DIR (default ~/.kvmesh/secrets), and keeps any that
# already exist there. Run it on the machine you deploy from; nothing here prints a secret or puts one on a
# command line.
#
#   ray-auth-token   Ray's token (RAY_AUTH_TOKEN_PATH): the cluster launcher's nodes and your `ray job submit`
#   kvmesh-token     kvmesh's gRPC token (KVMESH_TOKEN)
#   redis-password   the shared Redis's password (in KVMESH_REDIS_URL; hex, so it needs no URL quoting)
#   ca.crt, ca.key   a CA for kvmesh's gRPC TLS: node-cert.sh issues each node's certificate from it
#
#   deploy/make-secrets.sh [DIR]
set -eu
dir=${1:-$HOME/.kvmesh/secrets}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
for name in ray-auth-token kvmesh-token redis-password; do
  # no newline at the end: a Kubernetes Secret made --from-file keeps the file's bytes exactly
  [ -s "$dir/$name" ] || openssl rand -hex 32 | tr -d '\n' > "$dir/$name"
  [ -s "$dir/$name" ] || { echo "make-secrets: could not write $dir/$name" >&2; exit 1; }
done
if [ ! -s "$dir/ca.key" ] || [ ! -s "$dir/ca.crt" ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days 3650 \
    -subj "/CN=kvmesh-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
fi
echo "make-secrets: $dir has ray-auth-token kvmesh-token redis-password ca.crt ca.key" >&2
