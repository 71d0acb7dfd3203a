-- Writes whose cache invalidation (L2 fence + publish) is not yet known to be done.
-- The writer deletes its row once both succeeded; a relay on every instance repeats
-- them for rows left behind by a writer that crashed or met a Redis outage.
CREATE TABLE cache_outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item_id    bigint      NOT NULL,
    version    bigint      NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cache_outbox_claimed_at ON cache_outbox (claimed_at);
