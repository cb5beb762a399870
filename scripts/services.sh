# Shared by scripts/test and scripts/soak: installs and starts what the integration tests need.
# Source it; every function skips work that is already done.

CACHE_DIR="${API_NOTIFY_CACHE:-$HOME/.cache/api-notify}"
TANSU_VERSION=0.6.0
TEST_DB_USER=api_notify
TEST_DB_PASSWORD=api-notify-test-only

log() { printf '\033[1m[api-notify]\033[0m %s\n' "$*" >&2; }

tansu_ready() {
    command -v tansu >/dev/null 2>&1 &&
        tansu --help 2>/dev/null | grep -q 'Storage engines: dynostore, libsql'
}

# Builds the Kafka-protocol broker once per machine (20-30 minutes cold); prints the build pid.
start_tansu_build() {
    if tansu_ready; then return 0; fi
    log "building the Kafka-protocol broker tansu $TANSU_VERSION (first run on this machine only)"
    mkdir -p "$CACHE_DIR"
    cargo install --locked "tansu@$TANSU_VERSION" --features libsql,dynostore \
        >"$CACHE_DIR/tansu-build.log" 2>&1 &
    TANSU_BUILD_PID=$!
}

wait_tansu_build() {
    if [ -n "${TANSU_BUILD_PID:-}" ]; then
        wait "$TANSU_BUILD_PID" || { tail -30 "$CACHE_DIR/tansu-build.log"; return 1; }
    fi
    tansu_ready || { log "tansu is not usable (see $CACHE_DIR/tansu-build.log)"; return 1; }
}

ensure_mariadb() {
    if ! command -v mariadbd >/dev/null 2>&1; then
        log "installing MariaDB from Debian"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null
    fi
    if ! mariadb -e 'select 1' >/dev/null 2>&1; then
        log "starting MariaDB"
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
        for _ in $(seq 100); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
        MARIADB_STARTED_HERE=1
    fi
    mariadb -e "select 1" >/dev/null
    mariadb -e "CREATE USER IF NOT EXISTS '$TEST_DB_USER'@'127.0.0.1' IDENTIFIED BY '$TEST_DB_PASSWORD';
                GRANT ALL ON *.* TO '$TEST_DB_USER'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

stop_mariadb_if_started() {
    if [ -n "${MARIADB_STARTED_HERE:-}" ]; then
        log "stopping MariaDB"
        mariadb-admin shutdown >/dev/null 2>&1 || true
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts a broker on a free port in a fresh directory; sets KAFKA_PORT, KAFKA_DIR, KAFKA_PID.
start_broker() {
    KAFKA_PORT=$(free_port)
    KAFKA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/api-notify-kafka.XXXXXX")
    (cd "$KAFKA_DIR" && exec tansu broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine sqlite://tansu.db >broker.log 2>&1) &
    KAFKA_PID=$!
    timeout 30 bash -c "until </dev/tcp/127.0.0.1/$KAFKA_PORT; do sleep 0.2; done" 2>/dev/null ||
        { cat "$KAFKA_DIR/broker.log"; return 1; }
    log "broker listening on 127.0.0.1:$KAFKA_PORT (data in $KAFKA_DIR)"
}

stop_broker() {
    if [ -n "${KAFKA_PID:-}" ]; then
        kill "$KAFKA_PID" 2>/dev/null || true
        wait "$KAFKA_PID" 2>/dev/null || true
        rm -rf "$KAFKA_DIR"
    fi
}
