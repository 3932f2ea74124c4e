-- A domain's train/holdout counts (every domain view, every scheduler tick) read this index,
-- not every row's text: at 80k rows the full scan saturated a 2-core server.
CREATE INDEX corrections_domain_split ON corrections (domain_id, split);
