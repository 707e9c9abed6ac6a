"""Controllers of the embedded cluster (scheduler, Job, Deployment, Services), each an API client."""
