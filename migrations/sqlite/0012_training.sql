-- Each domain chooses how it trains (the `training` block, "auto" by default), a job may
-- override it, and a domain's label set can grow: the block and the labels are part of every
-- policy version.
ALTER TABLE domains ADD COLUMN training TEXT NOT NULL DEFAULT '"auto"';
ALTER TABLE domain_policies ADD COLUMN training TEXT NOT NULL DEFAULT '"auto"';
ALTER TABLE domain_policies ADD COLUMN labels TEXT;
UPDATE domain_policies SET labels = (SELECT labels FROM domains WHERE domains.id = domain_policies.domain_id);
-- A manual job's overrides of its domain's training block, as the caller sent them.
ALTER TABLE training_jobs ADD COLUMN training TEXT;
-- A steward may remove a correction: it stays, tombstoned, and trains nothing more.
ALTER TABLE corrections ADD COLUMN removed_at TEXT;
