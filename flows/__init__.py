"""Prefect flows over the autolabel stages: ordering, retries, content caching, schedules."""
