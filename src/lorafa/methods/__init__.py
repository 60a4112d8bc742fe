"""Init methods: pure functions (W, statistics, r, s, options) -> InitResult(A, B, subtract)."""

from .common import InitResult, randomized_svd, top_svd
from .registry import METHODS, Method, init_factors, make_options, method_options, resolve_method

__all__ = ["METHODS", "InitResult", "Method", "init_factors", "make_options", "method_options", "randomized_svd",
           "resolve_method", "top_svd"]
