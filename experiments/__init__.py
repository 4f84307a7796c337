"""Research probes: the dated experiments behind docs/experiments/ (each runs alone: `python -m experiments.NAME
--help`). Their pages and data are written to docs/experiments/; docs/experiments/README.md is the way in."""
