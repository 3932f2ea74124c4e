-- Domains are editable (PATCH /v1/domains/{d}): every change of a domain's policy is a new
-- numbered version kept whole in domain_policies, and audited as `domain_change` with its
-- before and after (as are a steward's relabel and removal of a correction).

ALTER TABLE audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check
    CHECK (action IN ('gate_decision', 'approve', 'reject', 'rollback', 'alias_move', 'domain_change',
                      'correction_relabel', 'correction_remove'));

ALTER TABLE domains ADD COLUMN policy_version BIGINT NOT NULL DEFAULT 1;

CREATE TABLE domain_policies (
    domain_id  BIGINT NOT NULL REFERENCES domains(id),
    version    BIGINT NOT NULL,
    policy     JSONB NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    at         TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (domain_id, version)
);
INSERT INTO domain_policies (domain_id, version, policy, actor, reason, at)
    SELECT id, 1, policy, 'registration', 'registered', created_at FROM domains;
