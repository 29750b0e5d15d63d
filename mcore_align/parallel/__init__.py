from mcore_align.parallel.runtime import ParallelConfig, Runtime, destroy, initialize, resolve_device, seed_everything

__all__ = ["ParallelConfig", "Runtime", "destroy", "initialize", "resolve_device", "seed_everything"]
