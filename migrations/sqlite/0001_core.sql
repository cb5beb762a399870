-- Core tables. Times are milliseconds since the Unix epoch, set by the gateway's clock.
CREATE TABLE IF NOT EXISTS notification (
    id              TEXT    NOT NULL PRIMARY KEY,
    request_id      TEXT    NOT NULL UNIQUE,
    partner_id      TEXT    NOT NULL,
    content_hash    TEXT    NOT NULL,
    endpoints       TEXT    NOT NULL,
    headers         TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER NULL,
    claim_token     TEXT    NULL,
    last_error      TEXT    NULL,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS notification_due ON notification (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS notification_partner ON notification (partner_id, state, next_attempt_at);

CREATE TABLE IF NOT EXISTS attempt (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    notification_id  TEXT    NOT NULL,
    number           INTEGER NOT NULL,
    endpoint         TEXT    NULL,
    plugin_version   TEXT    NULL,
    status_code      INTEGER NULL,
    error_class      TEXT    NULL,
    error            TEXT    NULL,
    duration_ms      INTEGER NOT NULL,
    response_excerpt TEXT    NULL,
    started_at       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempt_notification ON attempt (notification_id, number);

CREATE TABLE IF NOT EXISTS conflict (
    rejected_id     TEXT    NOT NULL PRIMARY KEY,
    request_id      TEXT    NOT NULL,
    partner_id      TEXT    NOT NULL,
    content_hash    TEXT    NOT NULL,
    received_at     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS conflict_request ON conflict (request_id);
