"""`tf_slim.arg_scope` support for tfbn's TF1 functions, without importing tf_slim.

tf_slim's `arg_scope([op, ...], **defaults)` keys each op by
`arg_scope_func_key(op)`, which is `op._key_op` (set by `@add_arg_scope`),
and refuses ops whose key it has not registered ("is not decorated with
@add_arg_scope"). The decorated op reads its defaults from the innermost
scope under the same key when it is called.

`scoped_like(module, name)` makes a tfbn function answer to the key of the
slim op it replaces (`tf_slim.layers.layers.batch_norm`), looked up when it
is asked for, in `sys.modules` only. So:

* tf_slim is never imported by tfbn: without it nobody can open an
  `arg_scope`, and the function runs as it is;
* `slim.arg_scope([slim.conv2d, slim.batch_norm], decay=0.9)` and
  `slim.arg_scope([slim.conv2d, tfbn.compat.v1.batch_norm], decay=0.9)`
  both set the defaults of `tfbn.compat.v1.batch_norm` (and of
  `slim.batch_norm`: it is the same entry), so migrating slim code means
  replacing the normalizer function only.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

_ARG_SCOPE_MODULE = "tf_slim.ops.arg_scope"


class SlimArgScoped:
    """A function that takes its defaults from `tf_slim.arg_scope` like a slim op.

    Calls go to the wrapped function with the keyword arguments of the
    innermost slim `arg_scope` that names it (or the slim op it replaces),
    overridden by the caller's own keyword arguments: slim's rule.
    """

    def __init__(self, function: Callable, slim_module: str, slim_name: str):
        functools.update_wrapper(self, function)
        self._slim_module = slim_module
        self._slim_name = slim_name
        self._own_key = f"{function.__module__}.{function.__qualname__}"

    @property
    def _key_op(self) -> str:
        """The key slim's `arg_scope` files this function under (slim reads it)."""
        slim_op = getattr(sys.modules.get(self._slim_module), self._slim_name, None)
        key = getattr(slim_op, "_key_op", None)
        return key if key is not None else self._own_key

    def __call__(self, *args, **kwargs):
        arg_scope = sys.modules.get(_ARG_SCOPE_MODULE)
        if arg_scope is not None:
            defaults = arg_scope.current_arg_scope().get(self._key_op)
            if defaults:
                kwargs = {**defaults, **kwargs}
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<function {self.__module__}.{self.__qualname__} (tf_slim arg_scope aware)>"


def scoped_like(slim_module: str, slim_name: str) -> Callable[[Callable], SlimArgScoped]:
    """Decorator: the function takes `arg_scope` defaults under a slim op's key.

    Args:
        slim_module: The module defining the slim op, e.g.
            `"tf_slim.layers.layers"`; only looked up in `sys.modules`.
        slim_name: The op's name in that module, e.g. `"batch_norm"`.

    Returns:
        A decorator returning a `SlimArgScoped` wrapper of the function.
    """

    def decorate(function: Callable) -> SlimArgScoped:
        return SlimArgScoped(function, slim_module, slim_name)

    return decorate
