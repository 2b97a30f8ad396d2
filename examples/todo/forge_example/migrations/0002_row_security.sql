-- Row-level security: a caller sees and writes only its own todos, even through a query that
-- forgets its owner filter. FORGE puts the caller into every call's transaction
-- (forge.user_id, forge.auth_kind, forge.roles); the system (crons, elevated code) sees all.
-- FORCE: the table's owner (the role the node connects as, usually) is bound too. Superusers
-- and BYPASSRLS roles are never bound - connect the node as a role that is neither.
ALTER TABLE todos ENABLE ROW LEVEL SECURITY;
ALTER TABLE todos FORCE ROW LEVEL SECURITY;
CREATE POLICY todos_owner ON todos
    USING (owner = current_setting('forge.user_id', true) OR current_setting('forge.auth_kind', true) = 'system')
    WITH CHECK (owner = current_setting('forge.user_id', true) OR current_setting('forge.auth_kind', true) = 'system');
