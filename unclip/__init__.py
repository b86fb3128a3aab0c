"""unclip: train, sample and compare unCLIP (DALL-E 2 style) text-to-image models."""
