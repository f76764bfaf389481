"""Training: the loop and its objects (engine, optim, tracking, preemption) and the life of the run
folder (checkpointer, lock, state, background_save); docs/design.md §6.7."""
