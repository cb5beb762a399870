-- Replay restarts the retry schedule: attempts made before the last replay do not count.
ALTER TABLE notification ADD COLUMN retry_base INTEGER NOT NULL DEFAULT 0;
-- Retention scans finished rows by age.
CREATE INDEX IF NOT EXISTS notification_finished ON notification (state, updated_at);

-- Breaker state per partner, written by dispatchers on each change, read by the API.
CREATE TABLE IF NOT EXISTS partner (
    partner_id   TEXT    NOT NULL PRIMARY KEY,
    breaker      TEXT    NOT NULL,
    changed_at   INTEGER NOT NULL
);
