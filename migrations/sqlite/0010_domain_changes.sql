-- Domains are editable (PATCH /v1/domains/{d}): every change of a domain's policy is a new
-- numbered version kept whole in domain_policies, and audited as `domain_change` with its
-- before and after (as are a steward's relabel and removal of a correction). SQLite cannot alter a CHECK constraint, so the audit log is rebuilt with its
-- rows, ids and triggers intact, as in 0004.

CREATE TABLE audit_log_v3 (
    id         INTEGER PRIMARY KEY,
    domain_id  INTEGER NOT NULL REFERENCES domains(id),
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL
               CHECK (action IN ('gate_decision', 'approve', 'reject', 'rollback', 'alias_move', 'domain_change',
                               'correction_relabel', 'correction_remove')),
    version    TEXT,
    reason     TEXT NOT NULL,
    data       TEXT
);
INSERT INTO audit_log_v3 SELECT id, domain_id, at, actor, action, version, reason, data FROM audit_log;
DROP TABLE audit_log;
ALTER TABLE audit_log_v3 RENAME TO audit_log;
CREATE INDEX audit_log_domain ON audit_log (domain_id, id);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

ALTER TABLE domains ADD COLUMN policy_version INTEGER NOT NULL DEFAULT 1;

CREATE TABLE domain_policies (
    domain_id  INTEGER NOT NULL REFERENCES domains(id),
    version    INTEGER NOT NULL,
    policy     TEXT NOT NULL,           -- JSON object, the whole policy of this version
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    at         TEXT NOT NULL,
    PRIMARY KEY (domain_id, version)
);
INSERT INTO domain_policies (domain_id, version, policy, actor, reason, at)
    SELECT id, 1, policy, 'registration', 'registered', created_at FROM domains;
