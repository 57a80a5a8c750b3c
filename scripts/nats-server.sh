# Sourced by the comparison scripts: `log`, and NATS_SERVER, the reference
# nats-server (the Debian package, installed with apt when missing; never
# from the tests).

log() { echo "$*" >&2; }

NATS_SERVER=$(command -v nats-server || true)
if [[ -z $NATS_SERVER && -x /usr/sbin/nats-server ]]; then
    NATS_SERVER=/usr/sbin/nats-server
fi
if [[ -z $NATS_SERVER ]]; then
    log "installing nats-server (Debian package)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
    NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server)
fi
