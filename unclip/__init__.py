"""unclip: train, sample and compare unCLIP (DALL-E 2 style) text-to-image models."""


def load(spec, clip=None, device="cpu", artifacts="outputs/artifacts"):
    """A trained stage (checkpoint path or published ``KIND[/NAME]``) with its EMA weights; see ``unclip.loading``."""
    from unclip.loading import load as _load

    return _load(spec, clip=clip, device=device, artifacts=artifacts)
