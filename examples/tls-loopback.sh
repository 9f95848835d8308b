#!/usr/bin/env bash
# A loopback migration over TLS, with throwaway credentials in QEMU's layout.
#
#   examples/tls-loopback.sh [SIZE]       SIZE of the one device, default 64M
#
# Makes a CA, a server and a client certificate with openssl (as you would for
# QEMU: `tls-creds-x509` directories holding ca-cert.pem, server-cert.pem and
# server-key.pem on the destination, ca-cert.pem, client-cert.pem and
# client-key.pem on the source), starts `vfio-multifd receive --tls-creds` on
# 127.0.0.1 with the client's subject as the only --tls-authz, shows a
# plaintext sender being refused (reason tls) while the daemon keeps waiting,
# then sends over 4 TLS channels with `vfio-multifd send --tls-creds` and checks
# the digests. Uses `vfio-multifd` from PATH, or else the project's .venv.
# Exit status 0 only if the TLS migration succeeded and the digests match.
set -euo pipefail

size=${1:-64M}
project=$(cd "$(dirname "$0")/.." && pwd)
if command -v vfio-multifd >/dev/null; then
    tool=(vfio-multifd)
elif [[ -x $project/.venv/bin/vfio-multifd ]]; then
    tool=("$project/.venv/bin/vfio-multifd")
else
    echo "tls-loopback: no vfio-multifd on PATH and no $project/.venv (run make install)" >&2
    exit 1
fi
command -v openssl >/dev/null || { echo "tls-loopback: needs openssl" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vfio-multifd-tls.XXXXXX")
daemon=
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# -- throwaway credentials, QEMU's directory layout -------------------------------------
ca=$work/ca server=$work/server client=$work/client
mkdir -p "$ca" "$server" "$client"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key "$ca/ca-key.pem"
openssl req -x509 -new -key "$ca/ca-key.pem" -out "$ca/ca-cert.pem" -days 1 \
    -subj "/O=vfio-multifd example/CN=throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
issue() { # issue DIR NAME SUBJECT EXTENSIONS: DIR/NAME-cert.pem and DIR/NAME-key.pem
    key "$1/$2-key.pem"
    openssl req -new -key "$1/$2-key.pem" -subj "$3" -out "$work/$2.csr"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "$4" >"$work/$2.ext"
    openssl x509 -req -in "$work/$2.csr" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" \
        -CAcreateserial -days 1 -extfile "$work/$2.ext" -out "$1/$2-cert.pem" 2>/dev/null
}
issue "$server" server "/O=Example/CN=localhost" \
    "$(printf 'extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost')"
issue "$client" client "/O=Example/CN=source.example.com" "extendedKeyUsage=clientAuth"
cp "$ca/ca-cert.pem" "$server/" && cp "$ca/ca-cert.pem" "$client/"
# The subject as the daemon compares it: RDNs in certificate order, no spaces.
subject=$(openssl x509 -in "$client/client-cert.pem" -noout -subject \
    -nameopt esc_2253,utf8,sep_comma_plus,sname | sed 's/^subject=//')
echo "tls-loopback: server credentials in $server: $(ls "$server" | tr '\n' ' ')"
echo "tls-loopback: client credentials in $client: $(ls "$client" | tr '\n' ' ')"
echo "tls-loopback: allowing the client subject '$subject'"

# -- the daemon ----------------------------------------------------------------------------
device="0000:00:02.0/vfio"
mkfifo "$work/ready"
"${tool[@]}" receive --listen tcp:127.0.0.1:0 --channels 4 --ready-fd 3 --no-fsync \
    --log-format json --tls-creds "$server" --tls-authz "$subject" \
    --device "idstr=$device,data=$work/nic0.bin" \
    3>"$work/ready" >"$work/receive.out" 2>"$work/receive.log" &
daemon=$!
if ! read -r -t 20 _ <"$work/ready"; then
    echo "tls-loopback: the daemon did not become ready:" >&2
    cat "$work/receive.log" >&2
    exit 1
fi
address=$(sed -n 's/.*"address": "\(tcp:[^"]*\)".*"event": "listening".*/\1/p' "$work/receive.log")
echo "tls-loopback: daemon ready on $address (TLS)"

# -- a plaintext sender: refused, the daemon goes on waiting ----------------------------------
# (Its own exit status says little: a refused channel whose bytes fit in the
# socket buffers looks sent. The daemon's log is the word.)
"${tool[@]}" send --connect "$address" --channels 1 --device "idstr=$device,size=1M" \
    --connect-timeout 5 >/dev/null 2>&1 || true
for _ in $(seq 50); do
    grep -q '"channel_refused"' "$work/receive.log" && break
    sleep 0.1
done
if ! grep '"channel_refused"' "$work/receive.log" | grep -q '"reason": "tls"'; then
    echo "tls-loopback: a plaintext sender was NOT refused" >&2
    cat "$work/receive.log" >&2
    exit 1
fi
echo "tls-loopback: a plaintext sender was refused:"
grep '"channel_refused"' "$work/receive.log" | head -n 1

# -- the real source, over TLS ---------------------------------------------------------------
if ! "${tool[@]}" send --connect "$address" --channels 4 --tls-creds "$client" \
    --device "idstr=$device,size=$size,seed=1" >"$work/send.out" 2>"$work/send.log"; then
    echo "tls-loopback: the sender failed:" >&2
    tail -n 5 "$work/send.log" >&2
    exit 1 # (the trap stops the daemon: SIGTERM cancels, no output left behind)
fi
if ! wait "$daemon"; then
    daemon=
    echo "tls-loopback: the daemon failed:" >&2
    tail -n 5 "$work/receive.log" >&2
    exit 1
fi
daemon=
cat "$work/send.out" "$work/receive.out"
sent=$(grep -o 'xxh3-128:[0-9a-f]*' "$work/send.out")
received=$(grep -o 'xxh3-128:[0-9a-f]*' "$work/receive.out")
if [[ -n $sent && $sent == "$received" ]]; then
    echo "tls-loopback: digests match"
else
    echo "tls-loopback: digests DIFFER" >&2
    exit 1
fi
