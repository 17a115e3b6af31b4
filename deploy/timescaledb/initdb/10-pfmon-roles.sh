#!/bin/sh
# First start of the database only (docker-entrypoint-initdb.d): the TimescaleDB extension
# where the server has it (plain PostgreSQL, which the archiver also serves, goes on
# without it) and a read-only role for Grafana. The archiver creates and migrates its own tables as
# the owner (POSTGRES_USER=pfmon); Grafana can only SELECT from them.
set -eu
: "${PFM_GRAFANA_DB_PASSWORD:?run pfmon init}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v grafana_password="$PFM_GRAFANA_DB_PASSWORD" <<'SQL'
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    ELSE
        RAISE NOTICE 'timescaledb is not available here: archiving to plain PostgreSQL';
    END IF;
END
$$;
CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
GRANT CONNECT ON DATABASE pfmon TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE pfmon IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
SQL
