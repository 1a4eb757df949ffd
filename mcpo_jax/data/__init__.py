"""Multi-domain prompt data: domains from config, their sources, mixing by weight, chat-templated batches.

    from mcpo_jax import data
    domains = data.parse_domains(config.data.domains)          # or data.default_domains()
    batches = data.PromptIterator(domains, tokenizer, batch_size=32, seed=0, max_prompt_tokens=256)
    batch = next(batches)   # .prompt_tokens [B, P] int32, .domain_id [B], .examples for the verifiers
    state = batches.get_state()                                # JSON-able; set_state(state) resumes exactly
"""

from mcpo_jax.data.batches import PromptBatch, PromptIterator
from mcpo_jax.data.domains import Domain, default_domains, domain_id, parse_domains
from mcpo_jax.data.errors import DataError
from mcpo_jax.data.sources import SPLITS, open_source
from mcpo_jax.data.tfds_source import prepare_tfds

__all__ = ["DataError", "Domain", "PromptBatch", "PromptIterator", "SPLITS", "default_domains", "domain_id",
           "open_source", "parse_domains", "prepare_tfds"]
