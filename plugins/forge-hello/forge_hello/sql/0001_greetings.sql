CREATE TABLE hello_greetings (
    id         bigserial PRIMARY KEY,
    node_id    text NOT NULL,
    greeting   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
