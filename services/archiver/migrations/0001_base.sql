-- pfmon archive, version 1: the tables every flavour (PostgreSQL, TimescaleDB) shares.
-- Applied once, in a transaction, under an advisory lock (services/archiver/migrate.py).
-- Natural keys make every write idempotent: a re-delivered message never becomes a second row.

-- raw readings as the collector published them (short retention)
CREATE TABLE IF NOT EXISTS pfm_readings (
    site text NOT NULL,
    meter text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    gateway text,
    profile text NOT NULL,
    poll_s double precision,
    data jsonb NOT NULL,
    PRIMARY KEY (site, meter, ts, seq)
);

-- per meter, per analytics interval: one column per Measurement (named by its value)
CREATE TABLE IF NOT EXISTS pfm_metrics (
    site text NOT NULL,
    meter text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    interval_s double precision NOT NULL,
    source text NOT NULL DEFAULT 'reading',
    source_seq bigint,
    -- seconds of energy this row stands for (interval_s, or the meter's poll interval)
    energy_s double precision,
    voltage_l1 double precision,
    voltage_l2 double precision,
    voltage_l3 double precision,
    current_l1 double precision,
    current_l2 double precision,
    current_l3 double precision,
    power_l1 double precision,
    power_l2 double precision,
    power_l3 double precision,
    reactive_power_l1 double precision,
    reactive_power_l2 double precision,
    reactive_power_l3 double precision,
    fund_reactive_power_l1 double precision,
    fund_reactive_power_l2 double precision,
    fund_reactive_power_l3 double precision,
    apparent_power_l1 double precision,
    apparent_power_l2 double precision,
    apparent_power_l3 double precision,
    nonactive_power_l1 double precision,
    nonactive_power_l2 double precision,
    nonactive_power_l3 double precision,
    power_factor_l1 double precision,
    power_factor_l2 double precision,
    power_factor_l3 double precision,
    displacement_pf_l1 double precision,
    displacement_pf_l2 double precision,
    displacement_pf_l3 double precision,
    frequency_l1 double precision,
    frequency_l2 double precision,
    frequency_l3 double precision,
    thd_voltage_l1 double precision,
    thd_voltage_l2 double precision,
    thd_voltage_l3 double precision,
    thd_current_l1 double precision,
    thd_current_l2 double precision,
    thd_current_l3 double precision,
    import_energy_l1 double precision,
    import_energy_l2 double precision,
    import_energy_l3 double precision,
    voltage_l1_l2 double precision,
    voltage_l2_l3 double precision,
    voltage_l3_l1 double precision,
    power double precision,
    reactive_power double precision,
    fund_reactive_power double precision,
    apparent_power double precision,
    effective_apparent_power double precision,
    power_factor double precision,
    effective_pf double precision,
    frequency double precision,
    neutral_current double precision,
    voltage_unbalance double precision,
    zero_seq_unbalance double precision,
    nema_unbalance double precision,
    neutral_score double precision,
    import_energy double precision,
    export_energy double precision,
    reactive_energy_ind double precision,
    reactive_energy_cap double precision,
    apparent_energy double precision,
    demand_power double precision,
    demand_apparent_power double precision,
    demand_pf double precision,
    supply_5v double precision,
    supply_12v double precision,
    delta_import_wh double precision,
    delta_export_wh double precision,
    delta_q1_varh double precision,
    delta_q2_varh double precision,
    delta_q3_varh double precision,
    delta_q4_varh double precision,
    delta_unsigned_varh double precision,
    delta_apparent_vah double precision,
    load jsonb,
    quadrant jsonb,
    averages jsonb,
    harmonics jsonb,
    PRIMARY KEY (site, meter, ts, seq)
);
-- a pfm_metrics table left by the walking skeleton gains the columns it lacks
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS voltage_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS voltage_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS voltage_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS current_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS current_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS current_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS reactive_power_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS reactive_power_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS reactive_power_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS fund_reactive_power_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS fund_reactive_power_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS fund_reactive_power_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS apparent_power_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS apparent_power_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS apparent_power_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS nonactive_power_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS nonactive_power_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS nonactive_power_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power_factor_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power_factor_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power_factor_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS displacement_pf_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS displacement_pf_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS displacement_pf_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS frequency_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS frequency_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS frequency_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS thd_voltage_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS thd_voltage_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS thd_voltage_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS thd_current_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS thd_current_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS thd_current_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS import_energy_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS import_energy_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS import_energy_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS voltage_l1_l2 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS voltage_l2_l3 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS voltage_l3_l1 double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS reactive_power double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS fund_reactive_power double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS apparent_power double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS effective_apparent_power double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS power_factor double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS effective_pf double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS frequency double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS neutral_current double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS voltage_unbalance double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS zero_seq_unbalance double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS nema_unbalance double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS neutral_score double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS import_energy double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS export_energy double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS reactive_energy_ind double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS reactive_energy_cap double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS apparent_energy double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS demand_power double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS demand_apparent_power double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS demand_pf double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS supply_5v double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS supply_12v double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_import_wh double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_export_wh double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_q1_varh double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_q2_varh double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_q3_varh double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_q4_varh double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_unsigned_varh double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS delta_apparent_vah double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT 'reading';
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS source_seq bigint;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS energy_s double precision;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS load jsonb;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS quadrant jsonb;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS averages jsonb;
ALTER TABLE pfm_metrics ADD COLUMN IF NOT EXISTS harmonics jsonb;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'pfm_metrics'
                 AND column_name = 'data') THEN
        ALTER TABLE pfm_metrics ALTER COLUMN data DROP NOT NULL;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS pfm_events (
    site text NOT NULL,
    meter text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    code text NOT NULL,
    state text NOT NULL CHECK (state IN ('raised', 'cleared', 'notice')),
    severity text NOT NULL,
    phase text,
    message text NOT NULL DEFAULT '',
    evidence jsonb NOT NULL DEFAULT '{}',
    service text NOT NULL DEFAULT '',
    PRIMARY KEY (site, meter, code, ts, seq)
);

CREATE TABLE IF NOT EXISTS pfm_commands (
    site text NOT NULL,
    device text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    register_table text NOT NULL,
    address integer NOT NULL,
    value bigint NOT NULL,
    reason text NOT NULL,
    origin text NOT NULL,
    trigger jsonb NOT NULL DEFAULT '{}',
    dry_run boolean NOT NULL DEFAULT false,
    PRIMARY KEY (site, device, ts, seq)
);

-- actuator states and gateway status, one row per message
CREATE TABLE IF NOT EXISTS pfm_device_status (
    site text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('actuator', 'gateway')),
    device text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    online boolean NOT NULL,
    message text NOT NULL DEFAULT '',
    data jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (site, kind, device, ts, seq)
);

CREATE INDEX IF NOT EXISTS pfm_metrics_site_ts ON pfm_metrics (site, ts DESC);
CREATE INDEX IF NOT EXISTS pfm_events_site_ts ON pfm_events (site, ts DESC);
CREATE INDEX IF NOT EXISTS pfm_commands_site_ts ON pfm_commands (site, ts DESC);
