"""Ray Serve applications (router ingress, expert replicas, job queue) over the store."""
