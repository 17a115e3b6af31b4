"""Alarms to people: pfmon alarm events to Alertmanager, silences, Home Assistant."""
