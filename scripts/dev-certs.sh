#!/usr/bin/env bash
# Creates a development CA and a server certificate for localhost/127.0.0.1
# in the given directory (default: certs/). Skips files that already exist.
# For production, use a certificate from a public CA that KMS trusts.
set -euo pipefail
dir=${1:-certs}
mkdir -p "$dir"
cd "$dir"
umask 077
if [ ! -f ca.key ] || [ ! -f ca.crt ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=xks-proxy dev CA" -keyout ca.key -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
if [ ! -f server.key ] || [ ! -f server.crt ]; then
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 397 \
    -extfile server.ext -out server.crt 2>/dev/null
  rm -f server.csr server.ext
fi
chmod 600 ca.key server.key
chmod 644 ca.crt server.crt
echo "certs: $(pwd)/ca.crt (dev CA), $(pwd)/server.crt + server.key (localhost)"
