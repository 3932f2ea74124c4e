-- An NDJSON upload commits in chunks; while it streams, no job may snapshot part of it. Each
-- upload that has committed a chunk and not finished is a row here: a job's snapshot stops
-- below `after_id` (the domain's last correction when the upload began) until the upload ends
-- or goes quiet (a crash leaves a row that `touched_at` lets the scheduler ignore).
CREATE TABLE open_uploads (
    id          TEXT PRIMARY KEY,
    domain_id   INTEGER NOT NULL REFERENCES domains(id),
    after_id    INTEGER NOT NULL,
    touched_at  TEXT NOT NULL
);
CREATE INDEX open_uploads_domain ON open_uploads (domain_id);
