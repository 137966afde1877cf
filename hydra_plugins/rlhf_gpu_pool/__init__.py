"""The project's Hydra launcher plugin: sweep jobs in parallel, one per GPU (gpu_pool_launcher.py)."""
