-- A claim leaves out partners at their in-flight cap (`partner_id NOT IN (…)`). With partner_id
-- in the due index, that filter is answered from the index: a partner with a large backlog no
-- longer costs one clustered-row read per pending row on every claim that skips it.
ALTER TABLE notification DROP INDEX notification_due,
    ADD INDEX notification_due (state, next_attempt_at, partner_id);
