"""The PEFT baselines, one file each: a plug-in package of the method registry (``benchmark.method_api.PLUGINS``)."""
