-- Serving: a domain's serving block (versioned with its policy), a role for production apps,
-- and the prediction log.
ALTER TABLE domains ADD COLUMN serving TEXT NOT NULL DEFAULT '{}';
ALTER TABLE domain_policies ADD COLUMN serving TEXT NOT NULL DEFAULT '{}';

-- SQLite cannot change a CHECK constraint in place: the table is rebuilt with `serving` allowed.
CREATE TABLE api_tokens_next (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'department', 'steward', 'serving')),
    domains     TEXT NOT NULL DEFAULT '[]',
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  TEXT
);
INSERT INTO api_tokens_next (id, name, role, domains, token_hash, created_at, created_by, revoked_at)
    SELECT id, name, role, domains, token_hash, created_at, created_by, revoked_at FROM api_tokens;
DROP TABLE api_tokens;
ALTER TABLE api_tokens_next RENAME TO api_tokens;
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;

-- What was answered, by whom, how sure: kept (sampled, redacted) so stewards can audit answers
-- and people can send feedback on them.
CREATE TABLE predictions (
    id            TEXT PRIMARY KEY,              -- UUIDv7
    domain_id     INTEGER NOT NULL REFERENCES domains (id),
    at            TEXT NOT NULL,
    alias         TEXT NOT NULL,
    version       TEXT,                          -- the model version that ran; NULL if none did
    input         TEXT NOT NULL,                 -- redacted under the domain's PII policy
    output        TEXT NOT NULL,                 -- the answer given
    model_output  TEXT,                          -- the small model's own answer, if it ran
    confidence    REAL,                          -- the small model's confidence in it
    escalated     INTEGER NOT NULL,
    answered_by   TEXT NOT NULL CHECK (answered_by IN ('model', 'teacher')),
    teacher_error TEXT,                          -- why the teacher did not answer an escalation
    latency_ms    REAL NOT NULL
);
CREATE INDEX predictions_domain_at ON predictions (domain_id, at);

-- Shadow scoring: a second alias's model answers the same inputs behind the answer given;
-- whether the two agreed is the online evidence beside a version's offline report.
CREATE TABLE shadow_scores (
    id              INTEGER PRIMARY KEY,
    domain_id       INTEGER NOT NULL REFERENCES domains (id),
    at              TEXT NOT NULL,
    alias           TEXT NOT NULL,                -- the shadow alias
    version         TEXT NOT NULL,                -- the version it named
    primary_version TEXT NOT NULL,                -- the version whose answer was given
    agrees          INTEGER NOT NULL
);
CREATE INDEX shadow_scores_domain_at ON shadow_scores (domain_id, at);
