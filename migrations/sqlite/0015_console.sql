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

-- Webhooks: decisions and failed jobs become events delivered at least once. Events are read
-- from the audit log (a decision and its audit row commit together) and from failed jobs not
-- yet announced; each becomes one delivery row per receiving URL, written in the transaction
-- that records the row as announced, so a crash between decision and delivery loses nothing.
-- Audit ids are not committed in order on PostgreSQL, so announced rows are recorded one by
-- one; the cursor only marks where every row is settled and announced (a floor for the
-- search), and starts at the log's end: an upgrade does not replay history.
CREATE TABLE webhook_cursor (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    audit_id  INTEGER NOT NULL
);
INSERT INTO webhook_cursor (id, audit_id) SELECT 1, COALESCE(MAX(id), 0) FROM audit_log;
CREATE TABLE webhook_announced (
    audit_id  INTEGER PRIMARY KEY
);
ALTER TABLE training_jobs ADD COLUMN failure_announced INTEGER NOT NULL DEFAULT 0;
UPDATE training_jobs SET failure_announced = 1 WHERE status = 'failed';
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY,
    event_id        TEXT NOT NULL,           -- the receiver's key to drop a redelivery
    event_type      TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,           -- the exact bytes signed and sent
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    delivered_at    TEXT,
    last_error      TEXT,
    UNIQUE (event_id, url)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE delivered_at IS NULL;
