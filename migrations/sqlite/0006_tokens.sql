-- API tokens. Only a token's sha256 is stored: tokens are 192-bit random strings, so a fast
-- hash loses nothing to guessing, and a leaked database leaks no credentials.
CREATE TABLE api_tokens (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'department', 'steward')),
    domains     TEXT NOT NULL DEFAULT '[]',     -- JSON array of domain names (scope)
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  TEXT
);
