"""pfmon's services (collector, analytics, actuator, archiver) and the ``pfmon`` CLI."""
