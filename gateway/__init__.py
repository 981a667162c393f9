"""The gateway: the HTTP app in front of the fleet (routes, keys, rate limits, the response cache,
jobs and training intake). Never imports TensorFlow."""
