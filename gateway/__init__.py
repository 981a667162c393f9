"""The gateway: routing by model name, ensembles, batches, ingestion. Never imports TensorFlow."""
