-- Progressive rollouts (docs/fleet.md): one row per rollout, its state machine driven by
-- whoever holds the lease, so a driver that dies is replaced and the rollout resumes
-- from its step.
CREATE TABLE fleet_rollouts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route            text        NOT NULL,
    from_group       text        NOT NULL,
    to_group         text        NOT NULL,
    steps            integer[]   NOT NULL,
    interval_ms      bigint      NOT NULL CHECK (interval_ms > 0),
    max_error_rate   float8      NOT NULL,
    max_p99_ms       float8      NOT NULL,
    -- running, succeeded, rolled_back
    state            text        NOT NULL DEFAULT 'running',
    step_index       integer     NOT NULL DEFAULT 0,
    -- NULL: the step's weights are not yet in force.
    step_started_at  timestamptz,
    reason           text,
    lease_holder     text,
    lease_expires_at timestamptz,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- At most one running rollout per route.
CREATE UNIQUE INDEX fleet_rollouts_running ON fleet_rollouts (route) WHERE state = 'running';
-- What each task saw of the target group during one step: cumulative over the step,
-- rewritten on every report. `buckets` counts responses by latency bound (see the code).
CREATE TABLE fleet_rollout_reports (
    rollout_id bigint      NOT NULL REFERENCES fleet_rollouts (id) ON DELETE CASCADE,
    step_index integer     NOT NULL,
    task_id    text        NOT NULL,
    requests   bigint      NOT NULL,
    errors     bigint      NOT NULL,
    buckets    bigint[]    NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, step_index, task_id)
);
