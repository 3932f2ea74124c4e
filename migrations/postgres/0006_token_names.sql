-- Token names are unique among live tokens, so an admin can tell them apart. Live duplicates
-- from before keep their oldest holder's name; the others get their id appended.
UPDATE api_tokens SET name = name || ' (' || id || ')'
WHERE revoked_at IS NULL
  AND id NOT IN (SELECT MIN(id) FROM api_tokens WHERE revoked_at IS NULL GROUP BY name);
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;
