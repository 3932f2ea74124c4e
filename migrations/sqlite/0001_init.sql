-- flywheel's own tables. apalis keeps its queue tables (`Jobs`, `Workers`) beside these with its
-- own migrator; SQLite table names ignore case, so none of ours may be called jobs or workers.

CREATE TABLE domains (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    task        TEXT NOT NULL CHECK (task IN ('classification', 'generation')),
    base_model  TEXT NOT NULL,
    labels      TEXT NOT NULL,           -- JSON array
    policy      TEXT NOT NULL,           -- JSON object
    created_at  TEXT NOT NULL
);

CREATE TABLE corrections (
    id            INTEGER PRIMARY KEY,
    domain_id     INTEGER NOT NULL REFERENCES domains(id),
    client_id     TEXT,
    content_hash  TEXT NOT NULL,
    input         TEXT NOT NULL,
    model_output  TEXT,
    expected      TEXT NOT NULL,
    source        TEXT NOT NULL CHECK (source IN ('human', 'teacher')),
    teacher       TEXT,
    metadata      TEXT NOT NULL,         -- JSON
    split         TEXT NOT NULL CHECK (split IN ('train', 'holdout')),
    created_at    TEXT NOT NULL,
    UNIQUE (domain_id, content_hash)
);
CREATE UNIQUE INDEX corrections_client_id ON corrections (domain_id, client_id) WHERE client_id IS NOT NULL;

CREATE TABLE training_jobs (
    id               TEXT PRIMARY KEY,   -- UUIDv7
    domain_id        INTEGER NOT NULL REFERENCES domains(id),
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    stage            TEXT NOT NULL,      -- train | evaluate | publish | done
    trigger          TEXT NOT NULL,
    snapshot_max_id  INTEGER NOT NULL,   -- corrections with id <= this are the job's data
    version          TEXT,               -- the version this job publishes, once it has one
    decision         TEXT,               -- JSON gate decision
    error            TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX jobs_domain_status ON training_jobs (domain_id, status);

CREATE TABLE job_events (
    id       INTEGER PRIMARY KEY,
    job_id   TEXT NOT NULL REFERENCES training_jobs(id),
    at       TEXT NOT NULL,
    kind     TEXT NOT NULL,              -- message | metrics
    message  TEXT NOT NULL,
    data     TEXT                        -- JSON
);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE versions (
    domain_id   INTEGER NOT NULL REFERENCES domains(id),
    version     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    job_id      TEXT NOT NULL REFERENCES training_jobs(id),
    promoted    INTEGER NOT NULL,        -- 0/1: did the gate promote it
    metrics     TEXT NOT NULL,           -- JSON summary
    created_at  TEXT NOT NULL,
    PRIMARY KEY (domain_id, version),
    UNIQUE (domain_id, seq)
);
