-- Core tables. Times are milliseconds since the Unix epoch (BIGINT), set by the gateway's clock.
CREATE TABLE IF NOT EXISTS notification (
    id              VARCHAR(40)  CHARACTER SET ascii NOT NULL PRIMARY KEY,
    request_id      VARCHAR(128) CHARACTER SET ascii NOT NULL,
    partner_id      VARCHAR(64)  CHARACTER SET ascii NOT NULL,
    content_hash    CHAR(64)     CHARACTER SET ascii NOT NULL,
    endpoints       TEXT         NOT NULL,
    headers         TEXT         NOT NULL,
    body            LONGBLOB     NOT NULL,
    state           VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    attempts        BIGINT       NOT NULL DEFAULT 0,
    next_attempt_at BIGINT       NOT NULL,
    lease_until     BIGINT       NULL,
    claim_token     VARCHAR(40)  CHARACTER SET ascii NULL,
    last_error      TEXT         NULL,
    created_at      BIGINT       NOT NULL,
    delivered_at    BIGINT       NULL,
    updated_at      BIGINT       NOT NULL,
    UNIQUE KEY notification_request_id (request_id),
    KEY notification_due (state, next_attempt_at),
    KEY notification_partner (partner_id, state, next_attempt_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS attempt (
    id               BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    notification_id  VARCHAR(40)  CHARACTER SET ascii NOT NULL,
    number           BIGINT       NOT NULL,
    endpoint         VARCHAR(2200) NULL,
    plugin_version   VARCHAR(64)  NULL,
    status_code      BIGINT       NULL,
    error_class      VARCHAR(32)  NULL,
    error            TEXT         NULL,
    duration_ms      BIGINT       NOT NULL,
    response_excerpt TEXT         NULL,
    started_at       BIGINT       NOT NULL,
    KEY attempt_notification (notification_id, number)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A request_id that arrived again with different content: recorded, never delivered.
CREATE TABLE IF NOT EXISTS conflict (
    rejected_id     VARCHAR(40)  CHARACTER SET ascii NOT NULL PRIMARY KEY,
    request_id      VARCHAR(128) CHARACTER SET ascii NOT NULL,
    partner_id      VARCHAR(64)  CHARACTER SET ascii NOT NULL,
    content_hash    CHAR(64)     CHARACTER SET ascii NOT NULL,
    received_at     BIGINT       NOT NULL,
    KEY conflict_request (request_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
