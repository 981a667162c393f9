"""The fleet-client library: calling the model services (replicas, failover, breakers, deadlines),
routing and ensembles, and fetching image URLs. No Flask: the gateway app, the job workers and the
bench import it."""
