#!/bin/sh
# As eclipse-mosquitto's: started as root, hand /mosquitto to the broker's user; mosquitto
# itself drops to that user after reading its configuration.
set -e
if [ "$(id -u)" = 0 ]; then
    chown -R mosquitto:mosquitto /mosquitto/data /mosquitto/log 2>/dev/null || true
fi
exec "$@"
