"""The Dagster layer: resources, asset factories, sensors, schedules and checks. Thin by design:
everything it does is a call into the plain-Python connectors, pipeline and warehouse."""
