"""The fine-tuning trainer: arguments, the recipe, one schedule step, monitoring, errors."""
