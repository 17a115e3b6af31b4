"""Archiver: metrics, events and commands into TimescaleDB / PostgreSQL."""
