"""kubetune's operator: API models, desired-state builders, kopf handlers, local runtime, CLI."""
