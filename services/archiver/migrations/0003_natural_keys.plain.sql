-- pfmon archive, version 3 on plain PostgreSQL (on TimescaleDB: services/archiver/timescale.py).
-- A seq names one message of one meter: a reused seq with another timestamp is a duplicate,
-- not a new row. A per-input metrics message (not an aggregate: energy_s IS NOT NULL) is
-- stored once per input (site, meter, source, source_seq), whatever analytics seq it carries
-- after a redelivery. Rows that already break these keys keep the first (earliest) one; the
-- rollup buckets of the rows removed are marked for a refresh.

DELETE FROM pfm_readings a USING pfm_readings b
WHERE a.site = b.site AND a.meter = b.meter AND a.seq = b.seq AND a.ts > b.ts;
CREATE UNIQUE INDEX IF NOT EXISTS pfm_readings_seq ON pfm_readings (site, meter, seq);

WITH gone AS (
    DELETE FROM pfm_metrics a USING pfm_metrics b
    WHERE a.site = b.site AND a.meter = b.meter AND a.seq = b.seq AND a.ts > b.ts
    RETURNING a.site, a.meter, a.ts
)
INSERT INTO pfm_rollup_dirty (site, meter, ts)
SELECT DISTINCT site, meter, date_bin('1 minute', ts, TIMESTAMPTZ '2000-01-03 00:00:00+00')
FROM gone
ON CONFLICT DO NOTHING;
CREATE UNIQUE INDEX IF NOT EXISTS pfm_metrics_seq ON pfm_metrics (site, meter, seq);

WITH gone AS (
    DELETE FROM pfm_metrics a USING pfm_metrics b
    WHERE a.site = b.site AND a.meter = b.meter AND a.source = b.source
      AND a.source_seq = b.source_seq
      AND a.energy_s IS NOT NULL AND b.energy_s IS NOT NULL
      AND (a.ts, a.seq) > (b.ts, b.seq)
    RETURNING a.site, a.meter, a.ts
)
INSERT INTO pfm_rollup_dirty (site, meter, ts)
SELECT DISTINCT site, meter, date_bin('1 minute', ts, TIMESTAMPTZ '2000-01-03 00:00:00+00')
FROM gone
ON CONFLICT DO NOTHING;
CREATE UNIQUE INDEX IF NOT EXISTS pfm_metrics_input ON pfm_metrics (site, meter, source, source_seq)
    WHERE energy_s IS NOT NULL AND source_seq IS NOT NULL;

-- 1-minute rollup buckets the database refused to compute (an overflowing value, any data
-- error), with the server's message; the other buckets go on (services/archiver/rollups.py).
-- A bucket leaves this table when a later refresh of it succeeds.
CREATE TABLE IF NOT EXISTS pfm_rollup_quarantine (
    site text NOT NULL,
    meter text NOT NULL,
    ts timestamptz NOT NULL,
    reason text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, meter, ts)
);
