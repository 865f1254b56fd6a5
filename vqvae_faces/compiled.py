"""One compiled `tf.function` per model, function and settings, traced once and reused by every caller.

Tracing costs seconds, so a function compiled anew on every call (or in every caller) would pay it
each time. `compiled` keeps the compiled functions beside the model, dropped with it.
"""

from __future__ import annotations

import weakref

import tensorflow as tf

_COMPILED: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def compiled(model, function, jit_compile: bool = False, **settings):
    """`tf.function(lambda *inputs: function(model, *inputs, **settings))`, created once per model,
    function, `jit_compile` (XLA) and settings (which must be hashable).

    `function` is a method of the model's class (`VQVAE.encode_to_tokens`) or any function whose
    first argument is the model (`token_search.search_tokens`).
    """
    functions = _COMPILED.setdefault(model, {})
    key = (function, jit_compile, tuple(sorted(settings.items())))
    if key not in functions:
        functions[key] = tf.function(lambda *inputs: function(model, *inputs, **settings), jit_compile=jit_compile)
    return functions[key]
