"""MTLoRA-family methods, one file each: a plug-in package of the method registry.

Each module registers its methods with ``benchmark.method_api.register_method``; the core finds them through
``benchmark.method_api.PLUGINS`` (one line per module), never by importing this package.
"""
