"""Protocol side of the benchmark: data, model, losses, metrics, runner glue and the CLI."""
