#!/bin/sh
# First start of the database only (docker-entrypoint-initdb.d): TimescaleDB extension
# and a read-only role for Grafana. The archiver creates and migrates its own tables as
# the owner (POSTGRES_USER=pfmon); Grafana can only SELECT from them.
set -eu
: "${PFM_GRAFANA_DB_PASSWORD:?run pfmon init}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v grafana_password="$PFM_GRAFANA_DB_PASSWORD" <<'SQL'
CREATE EXTENSION IF NOT EXISTS timescaledb;
CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
GRANT CONNECT ON DATABASE pfmon TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE pfmon IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
SQL
