-- Counts of personal data redacted from each correction before it was stored (JSON object
-- kind -> count; NULL when none). Never the values.
ALTER TABLE corrections ADD COLUMN pii_redacted TEXT;
