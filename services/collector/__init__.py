"""Collector (edge): polls meters over Modbus and publishes ``reading`` messages."""
