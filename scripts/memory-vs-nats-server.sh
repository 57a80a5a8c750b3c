#!/usr/bin/env bash
# Memory per idle subscription, Skiff against nats-server, measured the same
# way on both: a fresh server on a free loopback port, one raw TCP client
# that logs in (CONNECT, PING/PONG), then makes SUBS subscriptions
# (`SUB sub.N N`, sent in one go) and proves with PING/PONG that the server
# has handled them all. The server's RSS (VmRSS in /proc/PID/status) is read
# once the client is connected and again a second after the PONG; the
# growth divided by SUBS is the cost of one subscription.
#
#   scripts/memory-vs-nats-server.sh              # SUBS=10000
#   SUBS=100000 scripts/memory-vs-nats-server.sh
#
# Skiff runs as its release binary (built by `cargo build --release` if
# needed) with its defaults (`skiff serve --listen`, JetStream on, a fresh
# store directory); nats-server with JetStream on as well (`-js`, a fresh
# store directory). Installs the Debian nats-server package if it is
# missing. Prints both figures and the ratio on stdout (progress on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."

SUBS=${SUBS:-10000}

# shellcheck source=scripts/nats-server.sh
source scripts/nats-server.sh  # (the cwd is the repository root)

TARGET_DIR=${CARGO_TARGET_DIR:-target}
log "building skiff (release)"
cargo build --release --quiet -p skiff-tools --bin skiff
SKIFF=$TARGET_DIR/release/skiff

WORK=$(mktemp -d)
PID=
cleanup() {
    if [[ -n $PID ]]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for_port PORT: up to 30 s for a server to listen on PORT.
wait_for_port() {
    for _ in $(seq 300); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "no server came up on port $1"
    return 1
}

# measure PORT PID: prints "before after" (RSS in KiB) around SUBS
# subscriptions made by one client.
measure() {
    python3 - "$1" "$2" "$SUBS" <<'EOF'
import socket, sys, time

port, pid, subs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def rss_kib():
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS for the server")

sock = socket.create_connection(("127.0.0.1", port), timeout=60)
received = b""

def until(needle):
    global received
    deadline = time.monotonic() + 60
    while needle not in received:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {needle!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"server closed the connection: {received[-200:]!r}")
        received += chunk
    received = received[received.index(needle) + len(needle):]

until(b"\r\n")  # INFO
sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
until(b"PONG\r\n")
time.sleep(1)
before = rss_kib()
sock.sendall(b"".join(b"SUB sub.%d %d\r\n" % (i, i) for i in range(subs)) + b"PING\r\n")
until(b"PONG\r\n")
time.sleep(1)
after = rss_kib()
print(before, after)
sock.close()
EOF
}

# run NAME: measures the server started as the command line that follows.
# Prints bytes per subscription.
run() {
    local name=$1 port=$2
    shift 2
    "$@" >"$WORK/$name.log" 2>&1 &
    PID=$!
    wait_for_port "$port"
    read -r before after < <(measure "$port" "$PID")
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
    log "$name: RSS ${before} KiB -> ${after} KiB with $SUBS subscriptions"
    echo $(((after - before) * 1024 / SUBS))
}

port=$(free_port)
skiff=$(run skiff "$port" "$SKIFF" serve --listen "127.0.0.1:$port" --store "$WORK/skiff-store")
port=$(free_port)
nats=$(run nats-server "$port" "$NATS_SERVER" -a 127.0.0.1 -p "$port" -js -sd "$WORK/nats-store")

echo "RSS per idle subscription ($SUBS subscriptions, one client):"
echo "  skiff:       $skiff bytes"
echo "  nats-server: $nats bytes ($("$NATS_SERVER" --version 2>/dev/null || echo unknown version))"
python3 -c "import sys; s, n = int(sys.argv[1]), int(sys.argv[2]); print(f'  skiff / nats-server: {s / n:.2f}' if n > 0 else '  ratio: n/a')" "$skiff" "$nats"
