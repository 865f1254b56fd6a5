"""One compiled `tf.function` per model, function and settings, traced once and reused by every caller.

Tracing costs seconds, so a function compiled anew on every call (or in every caller) would pay it
each time. `compiled` keeps the compiled functions beside the model, dropped with it.
"""

from __future__ import annotations

import functools
import weakref

import tensorflow as tf

_COMPILED: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def compiled(model, function, jit_compile: bool = False, **settings):
    """`tf.function` of `function(model, *inputs, **settings)`, created once per model,
    function, `jit_compile` (XLA) and settings (which must be hashable).

    `function` is a method of the model's class (`VQVAE.encode_to_tokens`) or any function whose
    first argument is the model (`token_search.search_tokens`).
    """
    functions = _COMPILED.setdefault(model, {})
    key = (function, jit_compile, tuple(sorted(settings.items())))
    if key not in functions:
        # A partial rather than a lambda: TensorFlow counts retracing per code object, so lambdas made here would
        # all count as one function, and tracing a few different ones would warn of "excessive retracing".
        functions[key] = tf.function(functools.partial(function, model, **settings), jit_compile=jit_compile)
    return functions[key]
