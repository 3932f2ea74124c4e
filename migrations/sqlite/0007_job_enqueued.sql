-- When the scheduler handed a job to the queue. A queued job without it (created by the API,
-- or left behind by a crash between insert and push) is pushed on the scheduler's next pass.
ALTER TABLE training_jobs ADD COLUMN enqueued_at TEXT;
-- Jobs from before this column existed were all pushed when they were created.
UPDATE training_jobs SET enqueued_at = created_at;
