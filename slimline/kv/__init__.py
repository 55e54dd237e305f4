"""KV-cache machinery for generation: the compact cache, eviction policies, model adapters, the loop.

    cache.py       CompactKVCache: static buffers of S slots (S = the budget), positions, scores
    base.py        EvictionPolicy: weights per key from attention logits, rank for eviction
    keyformer.py   Keyformer: Gumbel-softmax score with a temperature schedule
    h2o.py         H2O: accumulated attention probabilities
    streaming.py   StreamingLLM: attention sinks + recent window
    attention.py   hand-written prefill (chunked, observed) and decode attention
    decoders.py    adapters for slimline's GPT and transformers Llama/Mistral/Qwen2; CompactDecodeStep
    session.py     DecodeSession: prefill, step, evict — what slimline.generate drives
    graphed.py     FixedSizeDecoder: a one-size cache's whole step (eviction included) as one CUDA graph

The contract (budgets, windows, where the policy lives) is in :mod:`slimline.passes.kv_prune`.
"""

from slimline.kv.base import EvictionPolicy
from slimline.kv.cache import CompactKVCache
from slimline.kv.decoders import CompactDecodeStep, DecoderAdapter, adapter_for
from slimline.kv.h2o import H2O
from slimline.kv.keyformer import Keyformer
from slimline.kv.session import DecodeSession, make_policy
from slimline.kv.streaming import StreamingLLM

__all__ = ["EvictionPolicy", "CompactKVCache", "CompactDecodeStep", "DecoderAdapter", "adapter_for", "H2O",
           "Keyformer", "StreamingLLM", "DecodeSession", "make_policy"]
