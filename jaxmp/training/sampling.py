"""Text from a trained language model (``--sample-tokens N``): what it learned, for a person to read.

Shapes: T = the model's window (``--seq-len``), V = vocabulary.

Generation is host-side and one token at a time: the trained parameters are brought into the model's
own layer order (unpacked from the pipeline's stage buffers when pipelined), copied to one device, and
the plain model (``apply_model``) reads the last ``T`` tokens and samples the next from its logits at the
last position. Small models and a few hundred tokens: no KV cache, one compiled function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.models.contract import apply_model, model_parts
from jaxmp.models.layers import LayerContext

TEMPERATURE = 0.8  # below 1: likelier characters, fewer misspellings than sampling the raw distribution


def layer_params(program, state):
    """The trained parameters in the model's own layer order, on the host."""
    params = program.to_saved(state).params if program.pipeline is not None else state.params
    return jax.device_get(params)


def generate(program, state, prompt_T: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` token ids sampled after ``prompt_T`` (a full window of ids), each from the model's
    logits at the last position of the window that ends with the tokens so far.

    Args:
      program: the trained program (``jaxmp.training.step.Program``).
      state: its train state.
      prompt_T: int token ids, as long as the model's window.
      count: tokens to generate.
      seed: seeds the sampling.
    """
    parts = model_parts(program.model)
    params = jax.device_put(layer_params(program, state), jax.devices()[0])

    @jax.jit
    def next_token(params, window_T, key):
        logits_1xTxV = apply_model(parts, params, window_T[None], LayerContext())
        return jax.random.categorical(key, logits_1xTxV[0, -1].astype(jnp.float32) / TEMPERATURE)

    window = jnp.asarray(prompt_T, jnp.int32)
    key = jax.random.key(seed)
    out = []
    for i in range(count):
        token = next_token(params, window, jax.random.fold_in(key, i))
        window = jnp.concatenate([window[1:], token[None].astype(jnp.int32)])
        out.append(token)
    return np.asarray(jax.device_get(out), np.int32)
