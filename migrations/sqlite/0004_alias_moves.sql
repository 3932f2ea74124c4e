-- Hand moves of non-production aliases (staging, canary, pins) are audited too. SQLite cannot
-- alter a CHECK constraint, so the log is rebuilt with its rows, ids and triggers intact.
-- (DROP TABLE's implicit delete fires no triggers.)

CREATE TABLE audit_log_v2 (
    id         INTEGER PRIMARY KEY,
    domain_id  INTEGER NOT NULL REFERENCES domains(id),
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL
               CHECK (action IN ('gate_decision', 'approve', 'reject', 'rollback', 'alias_move')),
    version    TEXT,
    reason     TEXT NOT NULL,
    data       TEXT
);
INSERT INTO audit_log_v2 SELECT id, domain_id, at, actor, action, version, reason, data FROM audit_log;
DROP TABLE audit_log;
ALTER TABLE audit_log_v2 RENAME TO audit_log;
CREATE INDEX audit_log_domain ON audit_log (domain_id, id);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
