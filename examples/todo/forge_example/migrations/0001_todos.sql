CREATE TABLE todos (
    id         uuid PRIMARY KEY,
    owner      text NOT NULL,
    title      text NOT NULL CHECK (length(title) <= 500),
    done       boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX todos_owner ON todos (owner, created_at);
