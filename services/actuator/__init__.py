"""Actuator: relay actions and capacitor-bank control over Modbus coils."""
