"""The engine: requests, the paged-KV block manager, the scheduler, sampling, the offline API."""
