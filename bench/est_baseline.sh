#!/usr/bin/env bash
# The baseline: EST re-enrollment alone, as a user would script it with
# openssl and curl. New P-256 key, CSR with the current certificate's Subject,
# POST to simplereenroll over mutual TLS with the current identity, and the
# new certificate extracted from the PKCS#7 reply.
# Usage: est_baseline.sh DEVICE_ROOT EST_URL WORKDIR
set -euo pipefail
sota=$1/var/sota
est=$2
work=$3
mkdir -p "$work"
umask 077
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/new.key"
# The CSR copies the current certificate's Subject and extensions byte for byte
# (the server compares them); the body of the PEM is the base64 of the DER.
openssl x509 -x509toreq -in "$sota/client.pem" -signkey "$work/new.key" -copy_extensions copy \
  -out "$work/csr.pem"
sed '/-----/d' "$work/csr.pem" > "$work/csr.b64"
curl -sS --fail --cacert "$sota/root.crt" --cert "$sota/client.pem" --key "$sota/pkey.pem" \
  -H "Content-Type: application/pkcs10" --data-binary "@$work/csr.b64" \
  -o "$work/reply.b64" "$est/simplereenroll"
# The reply may wrap lines with CRLF (RFC 7030 allows it): skip non-base64 bytes.
base64 --decode --ignore-garbage "$work/reply.b64" > "$work/reply.p7"
openssl pkcs7 -inform DER -in "$work/reply.p7" -print_certs -out "$work/new.crt"
grep -q "BEGIN CERTIFICATE" "$work/new.crt"
