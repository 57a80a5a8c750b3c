#!/usr/bin/env bash
# Compares Skiff with nats-server on this machine: the same `skiff bench`
# scenarios against both, in the same run, and markdown tables of
# Skiff / nats-server ratios on stdout (progress on stderr).
#
#   scripts/compare-nats-server.sh            # RUNS=3 by default
#   RUNS=5 MSGS=2000000 scripts/compare-nats-server.sh
#   SECTIONS=js scripts/compare-nats-server.sh   # durable streams only
#   SECTIONS=tls RUNS=1 scripts/compare-nats-server.sh   # TLS only
#   SECTIONS=cluster RUNS=3 scripts/compare-nats-server.sh  # 2-node clusters
#   SECTIONS=monitor RUNS=5 scripts/compare-nats-server.sh  # cost of monitoring
#
# Five sections: `core` (plain NATS messaging), `js` (durable streams:
# jspub with one and with four publishers, and jsconsume) and `tls` (core
# messaging, idle connections and connection set-up over TLS, both servers
# with the same certificate made by `skiff gen-certs`; clients are not
# asked for certificates) and
# `cluster` (two nodes of each, routed to each other on loopback, streams
# off on both; publishers on the first node, subscribers and repliers on the
# second, so every message crosses the route; CPU is both nodes' together)
# and `monitor` (Skiff against itself: with the HTTP monitoring endpoints on
# and scraped every second, as Prometheus would, and without).
# Outside the cluster section nats-server runs with JetStream on (`-js`, a
# fresh store directory), as Skiff does. The js section measures Skiff
# twice, as two servers started side by side: with its default
# `sync = "always"` (fsync before every PubAck, concurrent publishes sharing
# one fsync) and with `sync = "2m"` (fsync in the background, like
# nats-server's default, which does not fsync per message).
#
# Each pass starts both servers afresh on free loopback ports, measures the
# idle-connection memory first (so the numbers are not those of a server
# that has been under load), then the throughput and latency scenarios, the
# two servers one after the other per scenario (alternating who goes first).
# The table shows the median of RUNS passes, because a small shared machine
# is noisy. Installs the Debian nats-server package if it is missing; no
# test needs this script.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
MSGS=${MSGS:-1000000}         # pub, pubsub 16 B, fanout, queue
BIG_MSGS=${BIG_MSGS:-300000}  # pubsub 1 KiB
REQS=${REQS:-20000}           # reqrep
CONNS=${CONNS:-10000}         # idle connections
TIMEOUT=${TIMEOUT:-120s}      # bound on each bench run
JS_MSGS=${JS_MSGS:-200000}    # jspub 16 B, and jsconsume of those messages
JS_BIG_MSGS=${JS_BIG_MSGS:-100000}  # jspub 1 KiB
TLS_CONNS=${TLS_CONNS:-$CONNS}  # idle TLS connections
SECTIONS=${SECTIONS:-core js tls cluster monitor}

# shellcheck source=scripts/nats-server.sh
source scripts/nats-server.sh  # (the cwd is the repository root)

log "building skiff (release)"
cargo build --release --quiet -p skiff-tools --bin skiff
SKIFF=${CARGO_TARGET_DIR:-target}/release/skiff

# The idle-connection scenario holds CONNS sockets in the bench and as many
# in each server, which inherit this limit.
ulimit -n $(((CONNS > TLS_CONNS ? CONNS : TLS_CONNS) + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d)
# The servers of the current pass by name (skiff, skiff2m, nats, ...); for a
# cluster, SUBURL and PID2 are its second node's.
declare -A URL PID SUBURL PID2
# Background scrapers of the monitoring endpoints (not servers: their CPU is
# not counted).
SCRAPERS=()

stop_servers() {
    for pid in "${PID[@]}" "${PID2[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for pid in "${SCRAPERS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    URL=()
    PID=()
    SUBURL=()
    PID2=()
    SCRAPERS=()
}

cleanup() {
    stop_servers
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for_port PORT LOG: waits up to 30 s for a server to listen on PORT.
wait_for_port() {
    for _ in $(seq 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return
        fi
        sleep 0.1
    done
    log "no server came up on port $1; the end of its log:"
    tail -n 20 "$2" >&2
    exit 1
}

# Skiff with stream writes fsynced every 2 minutes instead of before each
# PubAck; everything else at its defaults.
printf '[jetstream]\nsync = "2m"\n' >"$WORK/skiff-2m.toml"
printf '[jetstream]\nenabled = false\n' >"$WORK/skiff-core.toml"

# One certificate for both TLS servers, trusted by the bench through the CA.
CERTS=$WORK/certs
"$SKIFF" gen-certs "$CERTS" --hosts localhost,127.0.0.1 --devices 0 >/dev/null 2>&1
printf 'tls {\n  cert_file: "%s"\n  key_file: "%s"\n}\n' \
    "$CERTS/server.pem" "$CERTS/server-key.pem" >"$WORK/nats-tls.conf"

# start_servers NAME...: fresh servers (skiff, skiff2m, nats) on free ports,
# each with a fresh stream store (never the working directory's).
start_servers() {
    stop_servers
    local name port store
    for name in "$@"; do
        port=$(free_port)
        store=$(mktemp -d -p "$WORK")
        case $name in
        skiff)
            "$SKIFF" serve --listen "127.0.0.1:$port" --store "$store" \
                >>"$WORK/$name.log" 2>&1 &
            ;;
        skiff2m)
            "$SKIFF" serve -c "$WORK/skiff-2m.toml" --listen "127.0.0.1:$port" --store "$store" \
                >>"$WORK/$name.log" 2>&1 &
            ;;
        nats)
            "$NATS_SERVER" -js -sd "$store" -a 127.0.0.1 -p "$port" >>"$WORK/$name.log" 2>&1 &
            ;;
        skifftls)
            "$SKIFF" serve --listen "127.0.0.1:$port" --store "$store" \
                --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server-key.pem" \
                >>"$WORK/$name.log" 2>&1 &
            ;;
        natstls)
            "$NATS_SERVER" -c "$WORK/nats-tls.conf" -js -sd "$store" -a 127.0.0.1 -p "$port" \
                >>"$WORK/$name.log" 2>&1 &
            ;;
        skiffmon)
            local http
            http=$(free_port)
            "$SKIFF" serve --listen "127.0.0.1:$port" --store "$store" --http "127.0.0.1:$http" \
                >>"$WORK/$name.log" 2>&1 &
            PID[$name]=$!
            scrape "$http" &
            SCRAPERS+=($!)
            ;;
        esac
        if [[ $name != skiffmon ]]; then
            PID[$name]=$!
        fi
        URL[$name]="nats://127.0.0.1:$port"
        if [[ $name == *tls ]]; then
            URL[$name]="tls://127.0.0.1:$port"
        fi
    done
    for name in "$@"; do
        wait_for_port "${URL[$name]##*:}" "$WORK/$name.log"
    done
}

# scrape PORT: what Prometheus and a dashboard would do to a monitored
# server: /metrics, /varz and /connz every second, until killed.
scrape() {
    while sleep 1; do
        for path in metrics varz connz; do
            curl -s -o /dev/null "http://127.0.0.1:$1/$path" || true
        done
    done
}

# start_clusters: two 2-node clusters, skiffc and natsc, on free ports; the
# second node of each is seeded with the first.
start_clusters() {
    stop_servers
    local name a b ra rb
    for name in skiffc natsc; do
        a=$(free_port) b=$(free_port) ra=$(free_port) rb=$(free_port)
        if [[ $name == skiffc ]]; then
            "$SKIFF" serve -c "$WORK/skiff-core.toml" --listen "127.0.0.1:$a" \
                --cluster-name bench --cluster-listen "127.0.0.1:$ra" >>"$WORK/$name-a.log" 2>&1 &
            PID[$name]=$!
            "$SKIFF" serve -c "$WORK/skiff-core.toml" --listen "127.0.0.1:$b" \
                --cluster-name bench --cluster-listen "127.0.0.1:$rb" \
                --routes "nats-route://127.0.0.1:$ra" >>"$WORK/$name-b.log" 2>&1 &
            PID2[$name]=$!
        else
            "$NATS_SERVER" -a 127.0.0.1 -p "$a" --cluster_name bench \
                --cluster "nats://127.0.0.1:$ra" >>"$WORK/$name-a.log" 2>&1 &
            PID[$name]=$!
            "$NATS_SERVER" -a 127.0.0.1 -p "$b" --cluster_name bench \
                --cluster "nats://127.0.0.1:$rb" --routes "nats://127.0.0.1:$ra" \
                >>"$WORK/$name-b.log" 2>&1 &
            PID2[$name]=$!
        fi
        URL[$name]="nats://127.0.0.1:$a"
        SUBURL[$name]="nats://127.0.0.1:$b"
        wait_for_port "$a" "$WORK/$name-a.log"
        wait_for_port "$b" "$WORK/$name-b.log"
    done
}

# Clock ticks of CPU the processes PID... have used (user + system); empty
# arguments are skipped.
cpu_ticks() {
    local total=0 pid
    for pid in "$@"; do
        if [[ -n $pid ]]; then
            total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
        fi
    done
    echo "$total"
}

# bench KEY SERVER ARGS...: one `skiff bench` run against SERVER (skiff,
# skiff2m or nats); appends "KEY SERVER CPU_TICKS JSON" to the results.
bench() {
    local key=$1 server=$2
    shift 2
    local url=${URL[$server]} pid=${PID[$server]} pid2=${PID2[$server]:-}
    local before json extra=()
    if [[ -n ${SUBURL[$server]:-} ]]; then
        extra=(--sub-server "${SUBURL[$server]}")
    fi
    before=$(cpu_ticks "$pid" "$pid2")
    # A run that lost messages exits non-zero but still prints its summary.
    json=$("$SKIFF" bench -s "$url" "${extra[@]}" --json --no-progress --timeout "$TIMEOUT" --server-pid "$pid" "$@" || true)
    if [[ -z $json ]]; then
        log "  $key against $server failed"
        return
    fi
    echo "$key $server $(($(cpu_ticks "$pid" "$pid2") - before)) $json" >>"$WORK/results"
}

# both KEY ARGS...: the scenario against both servers, alternating which
# goes first from one pass to the next.
both() {
    local key=$1
    shift
    log "  $key"
    if ((PASS % 2)); then
        bench "$key" skiff "$@"
        bench "$key" nats "$@"
    else
        bench "$key" nats "$@"
        bench "$key" skiff "$@"
    fi
}

# pair SKIFF NATS KEY ARGS...: like `both`, against the named servers.
pair() {
    local skiff=$1 nats=$2 key=$3
    shift 3
    log "  $key"
    local servers=("$skiff" "$nats")
    if ((PASS % 2 == 0)); then
        servers=("$nats" "$skiff")
    fi
    for server in "${servers[@]}"; do
        bench "$key" "$server" "$@"
    done
}

# both_tls KEY ARGS...: like `both`, against the TLS servers.
both_tls() {
    local key=$1
    shift
    pair skifftls natstls "$key" --tls-ca "$CERTS/ca.pem" "$@"
}

# both_cluster KEY ARGS...: like `both`, against the 2-node clusters.
both_cluster() {
    pair skiffc natsc "$@"
}

# all3 KEY ARGS...: the scenario against skiff, skiff2m and nats, rotating
# which goes first from one pass to the next.
all3() {
    local key=$1 i
    shift
    log "  $key"
    local order=(skiff skiff2m nats)
    for i in 0 1 2; do
        bench "$key" "${order[$(((i + PASS) % 3))]}" "$@"
    done
}

touch "$WORK/results"
for PASS in $(seq "$RUNS"); do
    log "pass $PASS of $RUNS"
    if [[ " $SECTIONS " == *" core "* ]]; then
        start_servers skiff nats
        both conns conns --conns "$CONNS"
        # Fresh servers again: the 10,000 closed connections are not under test.
        start_servers skiff nats
        both pub16 pub --msgs "$MSGS" --size 16
        both pubsub16 pubsub --msgs "$MSGS" --size 16
        both pubsub1k pubsub --msgs "$BIG_MSGS" --size 1024
        both fanout4 fanout --msgs "$MSGS" --size 16 --subs 4
        both queue4 queue --msgs "$MSGS" --size 16 --subs 4
        both reqrep reqrep --msgs "$REQS" --size 16
    fi
    if [[ " $SECTIONS " == *" js "* ]]; then
        # Fresh servers, so that the RSS after the jspub runs is theirs.
        start_servers skiff skiff2m nats
        all3 jspub1k jspub --msgs "$JS_BIG_MSGS" --size 1024
        # Four publishing connections at once: what group commit is for.
        all3 jspub1kx4 jspub --msgs "$JS_BIG_MSGS" --size 1024 --pubs 4
        all3 jspub16x4 jspub --msgs "$JS_MSGS" --size 16 --pubs 4
        # Leaves JS_MSGS messages of 16 B in the stream, for jsconsume.
        all3 jspub16 jspub --msgs "$JS_MSGS" --size 16
        all3 jsconsume jsconsume --msgs "$JS_MSGS" --size 16
    fi
    if [[ " $SECTIONS " == *" tls "* ]]; then
        start_servers skifftls natstls
        # Each connection: TCP, INFO, a TLS handshake, CONNECT, SUB, PING.
        both_tls tls_conns conns --conns "$TLS_CONNS"
        start_servers skifftls natstls
        both_tls tls_pub16 pub --msgs "$MSGS" --size 16
        both_tls tls_pubsub16 pubsub --msgs "$MSGS" --size 16
        both_tls tls_pubsub1k pubsub --msgs "$BIG_MSGS" --size 1024
    fi
    if [[ " $SECTIONS " == *" cluster "* ]]; then
        start_clusters
        both_cluster cl_pubsub16 pubsub --msgs "$MSGS" --size 16
        both_cluster cl_pubsub1k pubsub --msgs "$BIG_MSGS" --size 1024
        both_cluster cl_queue4 queue --msgs "$MSGS" --size 16 --subs 4
        both_cluster cl_reqrep reqrep --msgs "$REQS" --size 16
    fi
    if [[ " $SECTIONS " == *" monitor "* ]]; then
        start_servers skiff skiffmon
        pair skiffmon skiff mon_pub16 pub --msgs "$MSGS" --size 16
        pair skiffmon skiff mon_pubsub16 pubsub --msgs "$MSGS" --size 16
        pair skiffmon skiff mon_fanout4 fanout --msgs "$MSGS" --size 16 --subs 4
    fi
done
stop_servers

SKIFF_VERSION=$("$SKIFF" --version)
NATS_VERSION=$("$NATS_SERVER" --version)
python3 - "$WORK/results" "$RUNS" "$SKIFF_VERSION" "$NATS_VERSION" <<'PY'
import json, os, statistics, sys
from collections import defaultdict

path, runs, skiff_version, nats_version = sys.argv[1:]
tick = 1 / os.sysconf("SC_CLK_TCK")
results = defaultdict(list)
for line in open(path):
    key, server, ticks, text = line.split(" ", 3)
    report = json.loads(text)
    report["cpu_secs"] = int(ticks) * tick
    results[key, server].append(report)

def get(report, field):
    value = report
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value

def per_msg_ns(report):
    # Messages published (acked, for jspub), or consumed (jsconsume).
    count = report["published"] or report["received"]
    return report["cpu_secs"] * 1e9 / count if count else None

def mib(field):
    return lambda report: (get(report, field) or 0) / 1048576 or None

# (key, scenario, metric label, field or function, higher is better)
ROWS = [
    ("pub16", "pub, 16 B", "publish msgs/s", "pub_msgs_per_sec", True),
    ("pubsub16", "pubsub, 16 B", "delivered msgs/s", "sub_msgs_per_sec", True),
    ("pubsub1k", "pubsub, 1 KiB", "delivered MB/s", "sub_mb_per_sec", True),
    ("fanout4", "fanout to 4, 16 B", "delivered msgs/s (all subscribers)", "sub_msgs_per_sec", True),
    ("queue4", "queue group of 4, 16 B", "delivered msgs/s", "sub_msgs_per_sec", True),
    ("reqrep", "request/reply, 16 B", "p50 latency µs", "latency_us.p50", False),
    ("reqrep", "request/reply, 16 B", "p99 latency µs", "latency_us.p99", False),
    ("conns", "10,000 idle connections", "server RSS bytes per connection", "conns.bytes_per_conn", False),
]
CPU_ROWS = ["pub16", "pubsub16", "pubsub1k", "fanout4", "queue4", "reqrep"]

def median(key, server, metric):
    values = []
    for report in results.get((key, server), []):
        value = metric(report) if callable(metric) else get(report, metric)
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None

def lost(key, server):
    return sum(r["lost"] + r["duplicates"] for r in results.get((key, server), []))

def fmt(value):
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e4:
        return f"{value:,.0f}"
    return f"{value:,.1f}"

def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "n/a"

def notes(key, servers):
    return "".join(f"; {who} lost, refused or duplicated {count} msgs"
                   for who in servers if (count := lost(key, who)))

def row(scenario, label, metric, key, higher):
    s, n = median(key, "skiff", metric), median(key, "nats", metric)
    better = "higher is better" if higher else "lower is better"
    print(f"| {scenario} | {label} | {fmt(s)} | {fmt(n)} | {ratio(s, n)} "
          f"({better}{notes(key, ('skiff', 'nats'))}) |")

print(f"Skiff ({skiff_version}) vs {nats_version}: median of {runs} runs\n")
if any(server == "nats" and key in CPU_ROWS + ["conns"] for key, server in results):
    print("| Scenario | Metric | Skiff | nats-server | Skiff / nats-server |")
    print("|---|---|---|---|---|")
    for key, scenario, label, metric, higher in ROWS:
        row(scenario, label, metric, key, higher)
    for key in CPU_ROWS:
        scenario = next(r[1] for r in ROWS if r[0] == key)
        row(scenario, "server CPU ns per published msg", per_msg_ns, key, False)
    print()

# Durable streams: Skiff with sync = "always" and with sync = "2m", both
# against nats-server at its defaults.
JS_ROWS = [
    ("jspub16", "jspub, 16 B", "acked msgs/s", "pub_msgs_per_sec", True),
    ("jspub1k", "jspub, 1 KiB", "acked msgs/s", "pub_msgs_per_sec", True),
    ("jspub16x4", "jspub, 16 B, 4 publishers", "acked msgs/s", "pub_msgs_per_sec", True),
    ("jspub1kx4", "jspub, 1 KiB, 4 publishers", "acked msgs/s", "pub_msgs_per_sec", True),
    ("jsconsume", "jsconsume, 16 B", "consumed and acked msgs/s", "sub_msgs_per_sec", True),
    ("jspub16", "jspub, 16 B", "PubAck p50 latency µs", "latency_us.p50", False),
    ("jspub16", "after the jspub runs", "server RSS MiB", mib("js.server_rss"), False),
    ("jspub16", "jspub, 16 B", "server CPU ns per acked msg", per_msg_ns, False),
    ("jspub1k", "jspub, 1 KiB", "server CPU ns per acked msg", per_msg_ns, False),
    ("jsconsume", "jsconsume, 16 B", "server CPU ns per consumed msg", per_msg_ns, False),
]
# TLS: the same certificate on both servers.
TLS_ROWS = [
    ("tls_pub16", "pub over TLS, 16 B", "publish msgs/s", "pub_msgs_per_sec", True),
    ("tls_pubsub16", "pubsub over TLS, 16 B", "delivered msgs/s", "sub_msgs_per_sec", True),
    ("tls_pubsub1k", "pubsub over TLS, 1 KiB", "delivered MB/s", "sub_mb_per_sec", True),
    ("tls_conns", "idle TLS connections", "server RSS bytes per connection", "conns.bytes_per_conn", False),
    ("tls_conns", "TLS connection set-up, 64 at once", "connections/s (handshake included)", "conns.connects_per_sec", True),
    ("tls_pubsub16", "pubsub over TLS, 16 B", "server CPU ns per published msg", per_msg_ns, False),
]
# Clusters: publishers on node A, subscribers on node B.
CLUSTER_ROWS = [
    ("cl_pubsub16", "pub on A, sub on B, 16 B", "delivered msgs/s", "sub_msgs_per_sec", True),
    ("cl_pubsub1k", "pub on A, sub on B, 1 KiB", "delivered MB/s", "sub_mb_per_sec", True),
    ("cl_queue4", "pub on A, queue group of 4 on B", "delivered msgs/s", "sub_msgs_per_sec", True),
    ("cl_reqrep", "request on A, replier on B", "p50 latency µs", "latency_us.p50", False),
    ("cl_reqrep", "request on A, replier on B", "p99 latency µs", "latency_us.p99", False),
    ("cl_pubsub16", "pub on A, sub on B, 16 B", "CPU ns per msg, both nodes", per_msg_ns, False),
]

def table(rows, skiff, nats, names=("Skiff", "nats-server")):
    a, b = names
    print(f"| Scenario | Metric | {a} | {b} | {a} / {b} |")
    print("|---|---|---|---|---|")
    for key, scenario, label, metric, higher in rows:
        s, n = median(key, skiff, metric), median(key, nats, metric)
        better = "higher is better" if higher else "lower is better"
        print(f"| {scenario} | {label} | {fmt(s)} | {fmt(n)} | {ratio(s, n)} "
              f"({better}{notes(key, (skiff, nats))}) |")
    print()

if any(server == "natstls" for _, server in results):
    table(TLS_ROWS, "skifftls", "natstls")
if any(server == "natsc" for _, server in results):
    table(CLUSTER_ROWS, "skiffc", "natsc")

# Monitoring on (endpoints scraped every second) against off, both Skiff.
MONITOR_ROWS = [
    ("mon_pub16", "pub, 16 B", "publish msgs/s", "pub_msgs_per_sec", True),
    ("mon_pubsub16", "pubsub, 16 B", "delivered msgs/s", "sub_msgs_per_sec", True),
    ("mon_fanout4", "fanout to 4, 16 B", "delivered msgs/s", "sub_msgs_per_sec", True),
    ("mon_pub16", "pub, 16 B", "server CPU ns per published msg", per_msg_ns, False),
    ("mon_pubsub16", "pubsub, 16 B", "server CPU ns per published msg", per_msg_ns, False),
    ("mon_fanout4", "fanout to 4, 16 B", "server CPU ns per published msg", per_msg_ns, False),
]
if any(server == "skiffmon" for _, server in results):
    # The header reads "monitoring on / monitoring off" for the ratio.
    table(MONITOR_ROWS, "skiffmon", "skiff", ("monitoring on", "monitoring off"))

if any(key.startswith("js") for key, _ in results):
    print("| Scenario | Metric | Skiff, sync always | Skiff, sync 2m | nats-server "
          "| always / nats | 2m / nats |")
    print("|---|---|---|---|---|---|---|")
    for key, scenario, label, metric, higher in JS_ROWS:
        a, i, n = (median(key, who, metric) for who in ("skiff", "skiff2m", "nats"))
        better = "higher is better" if higher else "lower is better"
        print(f"| {scenario} | {label} | {fmt(a)} | {fmt(i)} | {fmt(n)} | {ratio(a, n)} "
              f"| {ratio(i, n)} ({better}{notes(key, ('skiff', 'skiff2m', 'nats'))}) |")
PY
