"""Prefect flows and the `cbtm` command line. Only this package imports Prefect."""
