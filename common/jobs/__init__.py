"""Batch jobs: what the gateway and the job workers share."""
