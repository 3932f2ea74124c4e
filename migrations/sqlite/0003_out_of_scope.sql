-- The label a classification domain uses for "none of the above", reported on its own.
ALTER TABLE domains ADD COLUMN out_of_scope_label TEXT;
