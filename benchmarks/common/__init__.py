"""What the benchmark scripts share: model, published formulation, timers, machine record, markdown."""
