-- A claim leaves out partners at their in-flight cap (`partner_id NOT IN (…)`). With partner_id
-- in the due index, that filter is answered from the index instead of reading each row.
DROP INDEX IF EXISTS notification_due;
CREATE INDEX notification_due ON notification (state, next_attempt_at, partner_id);
