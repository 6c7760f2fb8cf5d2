"""The ground floor of qrobust: corpus format, suites, sources, geometry, seeding
and the command line. Imports neither ``qrobust.generate`` nor ``qrobust.score``."""
