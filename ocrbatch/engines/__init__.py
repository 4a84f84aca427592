"""Engines: what drives the job's page flow (this process, or Ray actors on a cluster)."""
