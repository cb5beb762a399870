-- Replay restarts the retry schedule: attempts made before the last replay do not count.
ALTER TABLE notification ADD COLUMN retry_base BIGINT NOT NULL DEFAULT 0;
-- Retention scans finished rows by age.
CREATE INDEX notification_finished ON notification (state, updated_at);

-- Breaker state per partner, written by dispatchers on each change, read by the API.
CREATE TABLE IF NOT EXISTS partner (
    partner_id   VARCHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    breaker      VARCHAR(16) CHARACTER SET ascii NOT NULL,
    changed_at   BIGINT      NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
