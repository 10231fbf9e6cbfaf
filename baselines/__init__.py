"""The PEFT baselines, one file each; they register themselves in ``methods.METHODS`` on import."""
