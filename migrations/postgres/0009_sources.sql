-- Ingestion sources (#26): a domain's `sources` (versioned with its policy), when each is
-- polled and by whom, and what was read of each file or table.
ALTER TABLE domains ADD COLUMN sources JSONB NOT NULL DEFAULT '[]';
ALTER TABLE domain_policies ADD COLUMN sources JSONB NOT NULL DEFAULT '[]';

-- One row per (domain, source) the scheduler has seen: the next poll, the lease of the
-- worker polling it now (`claimed_by`, a token the poll carries), and when a poll last
-- found nothing left to read.
CREATE TABLE ingest_sources (
    domain_id     BIGINT NOT NULL REFERENCES domains(id),
    source        TEXT NOT NULL,
    next_poll_at  TIMESTAMPTZ NOT NULL,
    claimed_until TIMESTAMPTZ,
    claimed_by    TEXT,
    polled_at     TIMESTAMPTZ,
    caught_up_at  TIMESTAMPTZ,
    last_error    TEXT,
    PRIMARY KEY (domain_id, source)
);

-- One row per file version (key + ETag) or per table: `position` (lines or rows read of a
-- file, the last cursor value of a table) moves only in the transaction that stores the rows
-- read up to it, with a compare-and-swap on its old value.
CREATE TABLE ingest_units (
    id          BIGSERIAL PRIMARY KEY,
    domain_id   BIGINT NOT NULL REFERENCES domains(id),
    source      TEXT NOT NULL,
    unit        TEXT NOT NULL,
    version     TEXT NOT NULL,
    size        BIGINT NOT NULL DEFAULT 0,
    state       TEXT NOT NULL CHECK (state IN ('reading', 'done', 'quarantined', 'changed')),
    position    TEXT NOT NULL DEFAULT '',
    ingested    BIGINT NOT NULL DEFAULT 0,
    duplicates  BIGINT NOT NULL DEFAULT 0,
    rejected    BIGINT NOT NULL DEFAULT 0,
    dropped_pii BIGINT NOT NULL DEFAULT 0,
    errors      JSONB NOT NULL DEFAULT '[]',
    first_seen  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (domain_id, source, unit, version)
);
CREATE INDEX ingest_units_recent ON ingest_units (domain_id, source, updated_at);
