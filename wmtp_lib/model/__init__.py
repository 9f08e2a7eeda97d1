"""The MTP model, its losses, the training step and generation (layer 2)."""
