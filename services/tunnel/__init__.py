"""``pfmon wss-tunnel``: carries an edge broker's MQTT bridge over WebSockets + TLS."""
