"""train: the recipe that trains zipserve's reference checkpoints from scratch."""
