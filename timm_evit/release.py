"""Release settings: where this project's converted checkpoints live on the Hugging Face Hub, and
whether they are published there yet. Read by the model registrations (``evit_deit``) and by
``weights/hub.py``, which converts and publishes them."""
import os

__all__ = ['DEFAULT_HUB_NAMESPACE', 'HUB_NAMESPACE', 'EVIT_RELEASE_PUBLISHED', 'release_weights_published']

# Hugging Face Hub namespace of this project's converted checkpoints (weights/ publishes them).
DEFAULT_HUB_NAMESPACE = 'timm-evit'
HUB_NAMESPACE = os.environ.get('TIMM_EVIT_HUB_NAMESPACE', DEFAULT_HUB_NAMESPACE)

# The switch that makes the keep*_in1k tags live: set it once weights/hub.py has published the
# repositories under DEFAULT_HUB_NAMESPACE. Until then `pretrained=True` on such a tag fails at
# once and says how to load the official file. A namespace of your own (TIMM_EVIT_HUB_NAMESPACE)
# is where you published your own conversions: its tags are live.
EVIT_RELEASE_PUBLISHED = False


def release_weights_published() -> bool:
    """Whether the keep*_in1k repositories exist where their tags point (see EVIT_RELEASE_PUBLISHED)."""
    return EVIT_RELEASE_PUBLISHED or HUB_NAMESPACE != DEFAULT_HUB_NAMESPACE
