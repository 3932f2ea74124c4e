-- Serving: a domain's serving block (versioned with its policy), a role for production apps,
-- and the prediction log.
ALTER TABLE domains ADD COLUMN serving JSONB NOT NULL DEFAULT '{}';
ALTER TABLE domain_policies ADD COLUMN serving JSONB NOT NULL DEFAULT '{}';

ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_role_check;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_role_check
    CHECK (role IN ('admin', 'department', 'steward', 'serving'));

-- What was answered, by whom, how sure: kept (sampled, redacted) so stewards can audit answers
-- and people can send feedback on them.
CREATE TABLE predictions (
    id            TEXT PRIMARY KEY,              -- UUIDv7
    domain_id     BIGINT NOT NULL REFERENCES domains (id),
    at            TIMESTAMPTZ NOT NULL,
    alias         TEXT NOT NULL,
    version       TEXT,                          -- the model version that ran; NULL if none did
    input         TEXT NOT NULL,                 -- redacted under the domain's PII policy
    output        TEXT NOT NULL,                 -- the answer given
    model_output  TEXT,                          -- the small model's own answer, if it ran
    confidence    DOUBLE PRECISION,              -- the small model's confidence in it
    escalated     BOOLEAN NOT NULL,
    answered_by   TEXT NOT NULL CHECK (answered_by IN ('model', 'teacher')),
    teacher_error TEXT,                          -- why the teacher did not answer an escalation
    latency_ms    DOUBLE PRECISION NOT NULL
);
CREATE INDEX predictions_domain_at ON predictions (domain_id, at);
