"""Images in, activations out: image sources, extraction, the sharded activation store and sparse code stores."""

from sae_vlm.data.codes import CodeStore, write_codes
from sae_vlm.data.source import ActivationSource
from sae_vlm.data.store import as_source, open_store

__all__ = ["ActivationSource", "CodeStore", "as_source", "open_store", "write_codes"]
