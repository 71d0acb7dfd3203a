-- Fleet-wide runtime routing state (docs/fleet.md). The one row of `fleet_revision` counts
-- changes: every change bumps it in the statement that makes the change, and its row lock
-- queues concurrent changers, so revisions follow commit order and a snapshot that reads
-- revision N holds every change up to N and none after.
CREATE TABLE fleet_revision (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    revision bigint  NOT NULL
);
INSERT INTO fleet_revision (revision) VALUES (0);
-- A route's runtime split, by the revision that set it. `weights` NULL: reset to the
-- configuration file's weights (kept, so the reset has a revision like any change).
CREATE TABLE fleet_splits (
    route      text        PRIMARY KEY,
    weights    jsonb,
    revision   bigint      NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
-- Live tasks: each one refreshes its row every `fleet.poll_interval` and when it applies
-- a change; a row past `expires_at` is a task that died and is deleted by the next
-- heartbeat of any task.
CREATE TABLE fleet_tasks (
    id               text        PRIMARY KEY,
    version          text        NOT NULL,
    commit           text        NOT NULL,
    colour           text,
    started_at       timestamptz NOT NULL,
    seen_at          timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    applied_revision bigint      NOT NULL,
    applied_at       timestamptz,
    in_flight        bigint      NOT NULL DEFAULT 0
);
