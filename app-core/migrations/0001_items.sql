-- Items. `version` is bumped in the same statement as every change (see docs/cache-protocol.md):
-- the row lock orders writers, so versions follow commit order per row.
CREATE TABLE items (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    version    bigint      NOT NULL DEFAULT 1 CHECK (version >= 1)
);
