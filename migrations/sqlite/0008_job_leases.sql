-- Leases: a running job's worker refreshes `heartbeat_at`; a job whose heartbeat is older than
-- the lease goes back to the queue (its worker died), up to a few attempts.
ALTER TABLE training_jobs ADD COLUMN heartbeat_at TEXT;
ALTER TABLE training_jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
