-- Where each version stands, and an append-only record of every decision about it.

ALTER TABLE versions ADD COLUMN status TEXT NOT NULL DEFAULT 'held_back'
    CHECK (status IN ('promoted', 'held_back', 'pending_approval', 'rejected'));
UPDATE versions SET status = CASE WHEN promoted = 1 THEN 'promoted' ELSE 'held_back' END;

CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    domain_id  INTEGER NOT NULL REFERENCES domains(id),
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL CHECK (action IN ('gate_decision', 'approve', 'reject', 'rollback')),
    version    TEXT,
    reason     TEXT NOT NULL,
    data       TEXT                      -- JSON: metrics, alias move
);
CREATE INDEX audit_log_domain ON audit_log (domain_id, id);

-- The log is append-only: no row is ever changed or removed.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
