-- Each domain chooses how it trains (the `training` block, "auto" by default), a job may
-- override it, and a domain's label set can grow: the block and the labels are part of every
-- policy version.
ALTER TABLE domains ADD COLUMN training JSONB NOT NULL DEFAULT '"auto"'::jsonb;
ALTER TABLE domain_policies ADD COLUMN training JSONB NOT NULL DEFAULT '"auto"'::jsonb;
ALTER TABLE domain_policies ADD COLUMN labels JSONB;
UPDATE domain_policies SET labels = d.labels FROM domains d WHERE d.id = domain_policies.domain_id;
-- A manual job's overrides of its domain's training block, as the caller sent them.
ALTER TABLE training_jobs ADD COLUMN training JSONB;
-- A steward may remove a correction: it stays, tombstoned, and trains nothing more.
ALTER TABLE corrections ADD COLUMN removed_at TIMESTAMPTZ;
