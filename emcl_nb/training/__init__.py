"""Training: a run's model built from its parameters (build), the optimiser and schedule
(optim), the engine's loop (engine) with its checks, step log and checkpoints, the process
group (distributed), the runtime settings (runtime), and a whole run (run)."""
