-- Steward console sign-ins: the cookie carries a random secret, this table its sha256. A
-- session acts as the API token it was opened with (`token_hash`), so revoking the token ends
-- its sessions too; without auth it carries only the name its user gave.
CREATE TABLE console_sessions (
    id            INTEGER PRIMARY KEY,
    session_hash  TEXT NOT NULL UNIQUE,
    token_hash    TEXT,                     -- the API token's sha256; NULL without auth
    name          TEXT NOT NULL,            -- who signed in: the token's name, or the one given
    csrf          TEXT NOT NULL,            -- every form of this session must carry it
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    ended_at      TEXT                      -- signed out or revoked
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);

-- A steward may promote a held-back version over the gate: audited as `override`. The audit
-- log is rebuilt with its rows, ids and triggers intact, as in 0010.
CREATE TABLE audit_log_v4 (
    id         INTEGER PRIMARY KEY,
    domain_id  INTEGER NOT NULL REFERENCES domains(id),
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL
               CHECK (action IN ('gate_decision', 'approve', 'reject', 'override', 'rollback',
                                 'alias_move', 'domain_change', 'correction_relabel',
                                 'correction_remove')),
    version    TEXT,
    reason     TEXT NOT NULL,
    data       TEXT
);
INSERT INTO audit_log_v4 SELECT id, domain_id, at, actor, action, version, reason, data FROM audit_log;
DROP TABLE audit_log;
ALTER TABLE audit_log_v4 RENAME TO audit_log;
CREATE INDEX audit_log_domain ON audit_log (domain_id, id);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
